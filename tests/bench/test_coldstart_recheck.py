"""benchmarks/coldstart_recheck.py: a saved run read again puts each call in the group the run put it in
(the trace generated again from the run's config) and finds the p99 ratio the run reported."""

from __future__ import annotations

import gzip
import json
from dataclasses import asdict, replace

import numpy as np
import pytest

from benchmarks import coldstart_recheck
from benchmarks.coldstart_trace import (
    LONG_TAIL,
    PERIODIC,
    POISSON,
    ColdStartTraceConfig,
    analyze,
    generate_coldstart_trace,
)
from tests.bench.test_coldstart_trace import _record

CONFIG = ColdStartTraceConfig(num_popular=2, popular_rate_per_s=4.0, num_long_tail=4, hour_s=4.0, seed=3)


def _run(tail: str, slower_tail_ms: float) -> tuple[dict, list[dict]]:
    requests = generate_coldstart_trace(replace(CONFIG, tail=tail))
    rng = np.random.default_rng(0)
    records = [
        _record(r.request.index, r.request.arrival_s,
                float(rng.uniform(30, 60)) + (slower_tail_ms if r.kind == LONG_TAIL else 0), [20.0])
        for r in requests
    ]  # fmt: skip
    return analyze(requests, records) | {"tail": tail}, records


def test_a_saved_run_read_again_gives_the_ratio_the_run_reported(tmp_path, capsys):
    periodic, periodic_records = _run(PERIODIC, 0.0)
    poisson, poisson_records = _run(POISSON, 40.0)
    trace = json.loads(json.dumps(asdict(CONFIG)))  # as the run writes it: tuples become lists
    results = {"config": {"trace": trace}, "started_at": "then"}
    results["passes"] = {"periodic, hints on": periodic, "poisson, hints on": poisson}
    records = {"periodic, hints on": periodic_records, "poisson, hints on": poisson_records}
    checked = coldstart_recheck.recheck(results, records)
    for label, figures in results["passes"].items():
        assert checked[label]["observed"] == pytest.approx(figures["p99_ratio_by_chance"]["observed"])
        assert checked[label]["sizes"] == figures["p99_ratio_by_chance"]["sizes"]
    assert checked["poisson, hints on"]["p_value"] < 0.05 < checked["periodic, hints on"]["p_value"]

    (tmp_path / "run.json").write_text(json.dumps(results))
    with gzip.open(tmp_path / "records.json.gz", "wt") as f:
        json.dump(records, f)
    assert coldstart_recheck.main([str(tmp_path / "run.json"), str(tmp_path / "records.json.gz")]) == 0
    out = capsys.readouterr().out
    assert "poisson, hints on: long-tail p99 / popular p99" in out and "dealt out at random" in out
