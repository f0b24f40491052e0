"""The engine keeps the host memory a step frees: its large temporaries are not page-faulted in again."""

from __future__ import annotations

import subprocess
import sys

# The pattern of a decode step's gathered K and V: two 25 MB blocks and a smaller one, freed every step. Both
# runs start from a malloc that maps every block over 1 MiB afresh and trims all it can (what glibc's
# moving thresholds do to a step's temporaries some of the time, depending on the heap's history); the
# kept run then applies the engine's policy, which must override it.
_STEPS = """
import ctypes, resource, sys, torch
libc = ctypes.CDLL(None)
assert libc.mallopt(-3, 1 << 20) and libc.mallopt(-1, 0)  # M_MMAP_THRESHOLD 1 MiB, M_TRIM_THRESHOLD 0
if sys.argv[1] == "kept":
    from data_plane.engine.host_memory import keep_freed_memory
    assert keep_freed_memory()
n = (25 << 20) // 4
def step():
    a = torch.empty(n).fill_(1); b = torch.empty(n).fill_(1); c = torch.empty(n // 4).fill_(1)
    del a, b, c
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _STEPS, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def test_freed_temporaries_are_reused_without_page_faults():
    plain, kept = _page_faults("plain"), _page_faults("kept")
    assert plain >= 20 * 2 * (25 << 20) // 4096 // 2  # every block faulted in again, each step
    assert kept <= plain // 10  # (a few MB a step may still come and go with the small blocks)


def test_building_an_engine_applies_it(tiny_llama, monkeypatch):
    from data_plane.engine import host_memory

    from .conftest import make_engine

    monkeypatch.setattr(host_memory, "_applied", None)  # as in a fresh process
    engine = make_engine(tiny_llama)
    try:
        assert host_memory._applied is True  # glibc, on the machines this runs on, took both settings
    finally:
        engine.shutdown()
