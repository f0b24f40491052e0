"""benchmarks/attention_bench.py runs every CPU path and the native kernel, checks them against each other
and writes its rows."""

from __future__ import annotations

import json

from benchmarks import attention_bench
from openlora_kernels import paged_attention


def test_quick_bench_times_every_cpu_path_and_writes_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(attention_bench, "CPU_CASES", (attention_bench.Case(6, 3, 40),))
    out = tmp_path / "attention.json"
    attention_bench.main(["--quick", "--out", str(out)])
    rows = json.loads(out.read_text())
    assert [r["path"] for r in rows] == [*paged_attention.CPU_PATHS, "native"]  # the test machine builds it
    assert all(r["ms"] > 0 and r["num_seqs"] == 6 for r in rows)
    assert next(r for r in rows if r["path"] == "gather_sdpa")["vs_gather_sdpa"] == 1.0
    table = capsys.readouterr().out
    assert all(name in table for name in [*paged_attention.CPU_PATHS, "native"])
