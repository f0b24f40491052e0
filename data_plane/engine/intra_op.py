"""How many threads a thread's torch ops use, set per thread without changing it for the others.

torch keeps the intra-op thread count per thread (OpenMP's count, MKL's local count) and one process-wide
default: `torch.set_num_threads(n)` sets the calling thread's count and also makes n the default, and a
thread takes the default once, at its first parallel op (or `torch.get_num_threads()`), then keeps it.
The adapter loader capped its own threads at one with `torch.set_num_threads(1)`, so every thread started
after its first load computed on one thread: the worker's engine loop among them, as its first forward
came after the first request's disk read began. Two rules follow:

- `use_threads(n)` sets the calling thread's count and puts the default back as it found it;
- the engine sets the count it was built with on whatever thread steps it (`LLMEngine.step`), so no other
  thread's setting, before or after, decides how many threads a step uses.

Calls of `use_threads` take turns: the loader's two threads start together, and one that read the
default while the other had it at one put back one. Between the two halves of a call the default is n for
a moment: a thread that takes the default then keeps n. Threads that step an engine are covered by the
second rule. `threads(n)` is the same for one block (quantizing at load, training the demo model), the
thread's own count put back after it.

The default is read and put back on a short-lived thread of its own. Where no thread can be started (the
process is at its limit), the calling thread's count is still set and the default is left as that set
made it, with a warning: the loader and the engine keep working.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)

_turns = threading.Lock()  # one `use_threads` at a time: each puts back the default it read


def _on_new_thread(fn, *args):
    """`fn(*args)` on a thread of its own, which takes the process default at its first torch call; None
    when no thread could be started."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(fn(*args)), name="intra-op-default")
    try:
        thread.start()
    except RuntimeError as error:  # "can't start new thread"
        log.warning("intra-op thread count: no thread to read or restore the process default (%s)", error)
        return None
    thread.join()
    return result[0]


def process_default() -> int | None:
    """The count a thread that has run no parallel op yet would take (None: no thread to ask)."""
    return _on_new_thread(torch.get_num_threads)


def use_threads(n: int) -> None:
    """The calling thread's intra-op thread count becomes `n`, for good; the process default is left as
    it was."""
    with _turns:
        default = process_default()
        torch.get_num_threads()  # this thread takes the default now, so that it cannot replace `n` later
        torch.set_num_threads(n)
        if default is not None and default != n:
            _on_new_thread(torch.set_num_threads, default)


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """The calling thread computes on `n` intra-op threads for the block, then on its own count again; the
    process default is left as it was."""
    own = torch.get_num_threads()
    use_threads(n)
    try:
        yield
    finally:
        use_threads(own)
