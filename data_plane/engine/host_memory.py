"""The engine process keeps the host memory it frees, instead of handing it back to the kernel each step.

A step allocates and frees the same large temporaries every time: each layer's gathered K and V for decode
attention (25 MB each on the bench model at 128 sequences of 96 tokens), the logits, the MLP activations.
glibc's malloc gives freed memory at the top of its heap back to the kernel once more than its trim
threshold is free there, and serves large blocks with fresh mmaps (above a threshold it moves as it goes);
either way the next step's allocation faults its pages in again and the kernel zeroes every one. Measured
with `benchmarks.engine_bench`'s roofline engine (128 decoding sequences, 2 CPUs): once a layer's gathered K
and V reached 25 MB, every step took about 75,000 page faults and twice as long (170 ms against 88 ms).

`keep_freed_memory()` sets a trim threshold of 1 GiB (freed memory stays with the process, for the next
step) and fixes the mmap threshold at glibc's largest, 32 MiB (blocks up to that come from the heap and are
reused). Blocks above 32 MiB are still mapped per allocation: the decode attention's CPU paths keep their
copies under it (`openlora_kernels.paged_attention`). Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD_BYTES = 1 << 30
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's maximum on 64-bit (half its largest heap)

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Applies the policy above once per process; True when glibc took both settings."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (present in glibc only)
    except (OSError, AttributeError):
        log.debug("not glibc: malloc left as it is")
        return False
    ok = bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)) and bool(
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    )
    if not ok:
        log.warning("glibc refused the malloc settings; steps may page-fault their temporaries in again")
    return ok
