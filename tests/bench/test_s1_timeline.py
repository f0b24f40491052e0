"""The scenario-1 timeline's phases and their time-weighted summary (synthetic steps, no engine)."""

import pytest

from benchmarks.run_config import BenchConfig
from benchmarks.s1_timeline import phase_of, scenario1_trace, summarize


def test_a_step_is_full_slot_bound_admitting_or_tail():
    assert phase_of(running=128, waiting=40, max_num_seqs=128, free_slots=0) == "full"
    assert phase_of(running=70, waiting=40, max_num_seqs=128, free_slots=0) == "slot-bound"
    assert phase_of(running=70, waiting=40, max_num_seqs=128, free_slots=3) == "admitting"
    assert phase_of(running=70, waiting=0, max_num_seqs=128, free_slots=0) == "tail"


def test_the_summary_weights_the_running_set_by_each_steps_time():
    steps = [
        {"seconds": 3.0, "running": 128, "tokens": 384, "phase": "full"},
        {"seconds": 1.0, "running": 64, "tokens": 64, "phase": "slot-bound"},
        {"seconds": 1.0, "running": 8, "tokens": 8, "phase": "tail"},
    ]
    summary = summarize(steps, max_num_seqs=128)
    assert summary["seconds"] == 5.0 and summary["tokens"] == 456
    assert summary["mean_running"] == pytest.approx((3 * 128 + 64 + 8) / 5)
    assert summary["phases"]["full"]["share"] == pytest.approx(0.6)
    assert summary["phases"]["slot-bound"]["tokens_per_s"] == 64.0
    assert summary["phases"]["admitting"] == {
        "steps": 0,
        "seconds": 0,
        "share": 0.0,
        "mean_running": 0.0,
        "tokens": 0,
        "tokens_per_s": 0.0,
    }


def test_the_trace_is_scenario_ones():
    trace = scenario1_trace(BenchConfig())
    assert len(trace.requests) == 256
    assert {r.arrival_s for r in trace.requests} == {0.0}
    assert min(r.max_tokens for r in trace.requests) >= 16 and max(r.max_tokens for r in trace.requests) <= 64


def test_the_pass_by_part_places_the_whole_pass_and_counts_the_traces_tokens(tmp_path_factory):
    """`--parts`: one replay under profile_step's timers on a real (tiny) engine: the parts add up to the
    pass, the base linears and LoRA were seen, and every timer is taken off afterwards."""
    from benchmarks.profile_step import BASE, LORA, PARTS
    from benchmarks.s1_timeline import format_parts, replay_by_part
    from benchmarks.steady_driver import adapter_refs, make_engine
    from benchmarks.trace import Trace, TraceRequest
    from tests.bench.tiny_bench_model import tiny_bench_model

    model = tiny_bench_model(tmp_path_factory)
    dirs = model.adapters_by_rank[8][:3]
    refs = dict(zip(("a", "b", "c"), adapter_refs(dirs), strict=True))
    requests = tuple(
        TraceRequest(i, 0.0, name, (100 + i, 101, 102), 2 + i % 3)
        for i, name in enumerate(["a", "b", "c", "a"])
    )
    engine = make_engine(model.model_dir, 4, 8, max_lora_rank=8, num_slots=4)
    try:
        parts = replay_by_part(engine, Trace(scenario1_trace(BenchConfig()).config, requests), refs)
        assert not any(m._forward_pre_hooks for m in engine.runner.model.modules())
    finally:
        engine.shutdown()
    assert parts["output_tokens"] == sum(r.max_tokens for r in requests) and parts["prompt_tokens"] == 12
    assert set(parts["parts_ms"]) == set(PARTS)
    assert sum(parts["parts_ms"].values()) == pytest.approx(parts["seconds"] * 1e3)
    assert parts["parts_ms"][BASE] > 0 and parts["parts_ms"][LORA] > 0
    assert all(part in format_parts(parts) for part in PARTS)
