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
