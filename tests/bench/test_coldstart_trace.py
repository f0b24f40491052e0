import numpy as np
import pytest

from benchmarks.coldstart import (
    FIRST_CALL,
    LONG_TAIL,
    POPULAR,
    ColdStartTraceConfig,
    analyze,
    generate_coldstart_trace,
    load_window_s,
    split_itl_by_loads,
    targets,
)

CONFIG = ColdStartTraceConfig(
    num_popular=5, popular_rate_per_s=3.0, num_long_tail=12, hour_s=6.0, num_history_hours=4, seed=3
)


def _by_kind(requests, kind):
    return [r for r in requests if r.kind == kind]


def test_each_long_tail_adapter_is_called_once_per_hour_at_its_own_phase():
    requests = generate_coldstart_trace(CONFIG)
    long_tail = _by_kind(requests, LONG_TAIL)
    assert {r.request.adapter for r in long_tail} == set(CONFIG.long_tail_names)
    spacing_s = CONFIG.hour_s / CONFIG.num_long_tail
    for j, name in enumerate(CONFIG.long_tail_names):
        calls = sorted((r for r in long_tail if r.request.adapter == name), key=lambda r: r.request.arrival_s)
        assert [r.hour for r in calls] == list(range(CONFIG.num_hours))
        times = np.array([r.request.arrival_s for r in calls])
        expected = (j + 0.5) * spacing_s + CONFIG.hour_s * np.arange(CONFIG.num_hours)
        assert np.all(np.abs(times - expected) <= CONFIG.jitter_s + 1e-9)
        gaps = np.diff(times)
        assert np.all(np.abs(gaps - CONFIG.hour_s) <= 2 * CONFIG.jitter_s + 1e-9)


def test_long_tail_calls_before_the_history_hours_end_are_not_measured():
    requests = generate_coldstart_trace(CONFIG)
    for r in _by_kind(requests, LONG_TAIL):
        assert r.measured == (r.hour >= CONFIG.num_history_hours)
    measured_calls = sum(r.measured for r in _by_kind(requests, LONG_TAIL))
    assert measured_calls == CONFIG.num_long_tail * CONFIG.num_measured_hours


def test_popular_and_long_tail_adapters_are_disjoint_and_popular_traffic_follows_the_power_law():
    config = ColdStartTraceConfig(num_popular=4, popular_rate_per_s=50.0, num_long_tail=3, hour_s=8.0)
    requests = generate_coldstart_trace(config)
    popular = _by_kind(requests, POPULAR)
    assert {r.request.adapter for r in popular} <= set(config.popular_names)
    assert not set(config.popular_names) & set(config.long_tail_names)
    assert config.first_call_name not in set(config.popular_names) | set(config.long_tail_names)
    counts = [sum(r.request.adapter == name for r in popular) for name in config.popular_names]
    assert counts == sorted(counts, reverse=True)  # rank 1 most called, with 50/s over 72 s
    shares = np.array(counts) / len(popular)
    expected = np.arange(1, 5) ** -1.0 / np.sum(np.arange(1, 5) ** -1.0)
    assert np.allclose(shares, expected, atol=0.04)
    assert len(popular) == pytest.approx(config.popular_rate_per_s * config.duration_s, rel=0.1)
    assert all(0 <= r.request.arrival_s < config.duration_s for r in popular)


def test_the_first_call_adapter_is_called_exactly_once_during_the_measured_hours():
    requests = generate_coldstart_trace(CONFIG)
    first = _by_kind(requests, FIRST_CALL)
    assert len(first) == 1 and first[0].measured
    assert sum(r.request.adapter == CONFIG.first_call_name for r in requests) == 1


def test_trace_is_in_arrival_order_with_indices_and_is_reproducible():
    requests = generate_coldstart_trace(CONFIG)
    arrivals = [r.request.arrival_s for r in requests]
    assert arrivals == sorted(arrivals)
    assert [r.request.index for r in requests] == list(range(len(requests)))
    assert generate_coldstart_trace(CONFIG) == requests
    assert generate_coldstart_trace(ColdStartTraceConfig(seed=4)) != generate_coldstart_trace(
        ColdStartTraceConfig(seed=5)
    )


def test_jitter_that_could_reorder_long_tail_calls_is_refused():
    with pytest.raises(ValueError, match="jitter_s"):
        ColdStartTraceConfig(num_long_tail=10, hour_s=1.0, jitter_s=0.06)


def _record(index, scheduled_s, ttft_ms, itl_ms, tier="device", load_ms=0.0, queue_ms=0.0):
    return {
        "index": index,
        "scheduled_s": scheduled_s,
        "send_lag_ms": 0.0,
        "ttft_ms": ttft_ms,
        "server_ttft_ms": ttft_ms,
        "itl_ms": itl_ms,
        "cache_tier": tier,
        "adapter_load_ms": load_ms,
        "queue_ms": queue_ms,
        "error": None,
    }


def test_only_inter_token_gaps_overlapping_another_requests_load_count_as_during_loads():
    # Request 0 decodes from t=1.0 s with 100 ms gaps: [1.0,1.1], [1.1,1.2], [1.2,1.3], [1.3,1.4].
    decoding = _record(0, 0.0, 1000.0, [100.0, 100.0, 100.0, 100.0])
    # Request 1 arrives at 1.15 s, waits 100 ms for its adapter, loaded during [1.15, 1.25].
    loading = _record(1, 1.15, 200.0, [], tier="disk", load_ms=100.0, queue_ms=100.0)
    assert load_window_s(loading) == pytest.approx((1.15, 1.25))
    during, idle, num_windows = split_itl_by_loads([decoding, loading])
    assert num_windows == 1
    assert len(during) == 2 and len(idle) == 2


def test_targets_are_checked_against_popular_p99_warm_share_and_itl_ratio():
    config = ColdStartTraceConfig(num_popular=2, popular_rate_per_s=2.0, num_long_tail=2, hour_s=4.0)
    requests = generate_coldstart_trace(config)
    records = []
    for r in requests:
        tier = "disk" if r.kind == LONG_TAIL and r.hour == config.num_hours - 1 else "device"
        records.append(_record(r.request.index, r.request.arrival_s, 100.0, [20.0, 20.0], tier=tier))
    figures = analyze(requests, records)
    # Long tail: 2 adapters x 5 measured hours, the last hour's 2 calls from disk -> 80% warm.
    assert figures[LONG_TAIL]["requests"] == 10
    assert figures[LONG_TAIL]["warm_share"] == pytest.approx(0.8)
    checked = targets(figures)
    assert checked["long_tail_ttft_p99_vs_popular"]["met"]
    assert not checked["long_tail_warm_share"]["met"]
    assert not checked["itl_p99_during_loads_vs_none"]["met"]  # no load in flight: no ratio at all
