"""The engine keeps the host memory a step frees: its large temporaries are not page-faulted in again."""

from __future__ import annotations

import subprocess
import sys

# The pattern of a decode step's gathered K and V: two 25 MB blocks and a smaller one, freed every step.
_STEPS = """
import resource, sys, torch
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
    assert plain >= 1000  # glibc's defaults fault the blocks in again (the cost this policy removes)
    assert kept <= plain // 20


def test_building_an_engine_applies_it(tiny_llama, monkeypatch):
    from data_plane.engine import host_memory

    from .conftest import make_engine

    monkeypatch.setattr(host_memory, "_applied", None)  # as in a fresh process
    engine = make_engine(tiny_llama)
    try:
        assert host_memory._applied is True  # glibc, on the machines this runs on, took both settings
    finally:
        engine.shutdown()
