"""benchmarks/engine_split.py on a tiny model: every way steps the whole trace, each consumer takes every
token the engine made and spends the CPU time it was asked for on them, and the report reads the ratios."""

from __future__ import annotations

import json
import sys

import pytest

from benchmarks import engine_split
from benchmarks.serving_overhead import OverheadConfig
from tests.bench.tiny_bench_model import TINY, one_torch_thread, tiny_bench_model  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_both_consumers_take_every_token_and_spend_the_work_asked(tmp_path_factory):
    root = tiny_bench_model(tmp_path_factory).root
    trace = OverheadConfig(num_requests=12, num_adapters=4, output_len_range=(4, 4), num_adapter_slots=4)
    cfg = engine_split.SplitConfig(per_token_us=(200.0,), passes=1, trace=trace)
    results = engine_split.run(cfg, shape=TINY, root=root)
    entry = results["by_per_token_us"]["200.0"]
    (figures,) = entry["passes"]
    assert {way["tokens"] for way in figures.values()} == {12 * 4}
    for way in ("thread", "process"):
        assert figures[way]["consumer_tokens"] == 12 * 4
        # 48 tokens x 200 us = 9.6 ms of the consumer's own CPU time (more by the spin's last round only)
        assert 0.0096 <= figures[way]["consumer_cpu_s"] < 0.5
    assert "consumer_cpu_s" not in figures["none"]
    assert set(entry["ratios"]) == {"thread/none", "process/none", "thread/process"}
    json.dumps(results, default=str)  # what main writes
    report = engine_split.report(results)
    assert "200 us of consumer CPU per token, 1 passes" in report and "sharing the process loses" in report


def test_ratios_are_per_pass_quotients():
    def way(tokens_per_s):
        return {"tokens_per_s": tokens_per_s}

    passes = [
        {"none": way(100.0), "thread": way(90.0), "process": way(80.0)},
        {"none": way(200.0), "thread": way(100.0), "process": way(200.0)},
        {"none": way(100.0), "thread": way(95.0), "process": way(100.0)},
    ]
    r = engine_split.ratios(passes)
    shared = r["thread/process"]
    assert (shared["median"], shared["min"], shared["max"]) == (0.95, 0.5, 1.125)
    assert shared["min"] <= shared["ci95"][0] <= shared["median"] <= shared["ci95"][1] <= shared["max"]
    assert r["thread/none"]["median"] == 0.9 and r["process/none"]["max"] == 1.0


def test_the_short_switch_interval_way_runs_the_thread_consumer_at_that_interval_only(
    tmp_path_factory, monkeypatch
):
    root = tiny_bench_model(tmp_path_factory).root
    trace = OverheadConfig(num_requests=6, num_adapters=3, output_len_range=(3, 3), num_adapter_slots=3)
    cfg = engine_split.SplitConfig(per_token_us=(50.0,), passes=1, trace=trace, switch_interval_ms=0.5)
    real, seen = engine_split.on_engine_thread, []

    def recording(fn, engine, requests, refs, send):
        seen.append((getattr(send, "__self__", None) is not None, sys.getswitchinterval()))
        return real(fn, engine, requests, refs, send)

    monkeypatch.setattr(engine_split, "on_engine_thread", recording)
    default = sys.getswitchinterval()
    results = engine_split.run(cfg, shape=TINY, root=root)
    (figures,) = results["by_per_token_us"]["50.0"]["passes"]
    assert set(figures) == {"none", "thread", "process", "thread@0.5ms"}
    assert figures["thread@0.5ms"]["consumer_tokens"] == figures["thread"]["consumer_tokens"] == 6 * 3
    intervals = sorted(interval for _, interval in seen)
    assert intervals[0] == 0.0005 and intervals.count(0.0005) == 1  # that way's step-through alone
    assert intervals[1:] == [default] * (len(seen) - 1)
    assert sys.getswitchinterval() == default
    ratios = results["by_per_token_us"]["50.0"]["ratios"]
    assert {"thread@0.5ms/process", "thread@0.5ms/thread"} <= set(ratios)
