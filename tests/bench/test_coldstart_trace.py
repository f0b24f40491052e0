"""The cold-start benchmark's traces (periodic and Poisson long tails), its analysis, and the `openlora up`
command line it runs (documented flags only)."""

from dataclasses import replace
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from benchmarks.coldstart import (
    ColdStartConfig,
    config_from_args,
    pass_label,
    prefetch_counts,
    prefetch_windows_s,
    up_argv,
    worker_loads,
)
from benchmarks.coldstart_report import target_lines
from benchmarks.coldstart_trace import (
    FIRST_CALL,
    LONG_TAIL,
    PERIODIC,
    POISSON,
    POPULAR,
    ColdStartTraceConfig,
    analyze,
    bootstrap_interval,
    cold_calls,
    generate_coldstart_trace,
    label_permutations,
    load_window_s,
    popularity_deciles,
    split_itl_by_loads,
    targets,
    why_cold,
)
from control_plane.prediction.demand import PredictorConfig, period_of

CONFIG = ColdStartTraceConfig(
    num_popular=5, popular_rate_per_s=3.0, num_long_tail=12, hour_s=6.0, num_history_hours=4, seed=3
)


def _by_kind(requests, kind):
    return [r for r in requests if r.kind == kind]


def _tail_times(requests, name) -> np.ndarray:
    return np.array(sorted(r.request.arrival_s for r in requests if r.request.adapter == name))


def test_periodic_tail_calls_each_adapter_once_an_hour_within_its_jitter():
    requests = generate_coldstart_trace(CONFIG)
    long_tail = _by_kind(requests, LONG_TAIL)
    assert {r.request.adapter for r in long_tail} == set(CONFIG.long_tail_names)
    assert CONFIG.jitter_s == pytest.approx(0.5)  # five minutes of a 6 s "hour"
    spacing_s = CONFIG.hour_s / CONFIG.num_long_tail
    jitters = []
    for j, name in enumerate(CONFIG.long_tail_names):
        times = _tail_times(requests, name)
        expected = (j + 0.5) * spacing_s + CONFIG.hour_s * np.arange(CONFIG.num_hours)
        assert len(times) == CONFIG.num_hours
        jitters.extend(times - expected)
        # The predictor (default tolerance) finds the hour in every adapter's calls.
        assert period_of(list(times), PredictorConfig()) == pytest.approx(CONFIG.hour_s, rel=0.1)
    jitters = np.abs(np.array(jitters))
    assert np.all(jitters <= CONFIG.jitter_s + 1e-9)
    assert jitters.max() > 0.5 * CONFIG.jitter_s  # the jitter is used, not zero


def test_poisson_tail_calls_each_adapter_once_an_hour_on_average_at_no_period():
    config = ColdStartTraceConfig(
        tail=POISSON, num_popular=1, popular_rate_per_s=0.1, num_long_tail=200, hour_s=5.0,
        num_history_hours=10, num_measured_hours=30, seed=11,
    )  # fmt: skip
    requests = generate_coldstart_trace(config)
    counts = [len(_tail_times(requests, name)) for name in config.long_tail_names]
    # 200 adapters x 40 hours: 8000 calls expected (Poisson sd about 1.1%).
    assert np.mean(counts) / config.num_hours == pytest.approx(1.0, abs=0.05)
    gaps = np.concatenate([np.diff(_tail_times(requests, name)) for name in config.long_tail_names])
    assert np.mean(gaps) == pytest.approx(config.hour_s, rel=0.05)
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(1.0, abs=0.1)  # exponential gaps
    periodic = sum(
        period_of(list(_tail_times(requests, name)), PredictorConfig()) is not None
        for name in config.long_tail_names
    )
    assert periodic <= 0.1 * config.num_long_tail


def test_both_tails_share_the_popular_traffic_and_differ_in_the_tail():
    periodic = generate_coldstart_trace(CONFIG)
    poisson = generate_coldstart_trace(ColdStartTraceConfig(**{**CONFIG.__dict__, "tail": POISSON}))
    assert [r.request for r in _by_kind(periodic, POPULAR)] != []
    arrivals = [(r.request.arrival_s, r.request.adapter) for r in _by_kind(periodic, POPULAR)]
    assert arrivals == [(r.request.arrival_s, r.request.adapter) for r in _by_kind(poisson, POPULAR)]
    assert [r.request.arrival_s for r in _by_kind(periodic, LONG_TAIL)] != [
        r.request.arrival_s for r in _by_kind(poisson, LONG_TAIL)
    ]


def test_long_tail_calls_before_the_history_hours_end_are_not_measured():
    for tail in (PERIODIC, POISSON):
        config = ColdStartTraceConfig(**{**CONFIG.__dict__, "tail": tail})
        for r in generate_coldstart_trace(config):
            assert r.measured == (r.request.arrival_s >= config.measured_from_s)
            assert r.hour == int(r.request.arrival_s // config.hour_s)


def test_popular_and_long_tail_adapters_are_disjoint_and_popular_traffic_follows_the_power_law():
    config = ColdStartTraceConfig(num_popular=4, popular_rate_per_s=50.0, num_long_tail=3, hour_s=8.0)
    requests = generate_coldstart_trace(config)
    popular = _by_kind(requests, POPULAR)
    assert {r.request.adapter for r in popular} <= set(config.popular_names)
    assert not set(config.popular_names) & set(config.long_tail_names)
    assert config.first_call_name not in set(config.popular_names) | set(config.long_tail_names)
    counts = [sum(r.request.adapter == name for r in popular) for name in config.popular_names]
    assert counts == sorted(counts, reverse=True)
    shares = np.array(counts) / len(popular)
    expected = np.arange(1, 5) ** -1.0 / np.sum(np.arange(1, 5) ** -1.0)
    assert np.allclose(shares, expected, atol=0.04)
    assert len(popular) == pytest.approx(config.popular_rate_per_s * config.duration_s, rel=0.1)


def test_the_first_call_adapter_is_called_exactly_once_during_the_measured_hours():
    requests = generate_coldstart_trace(CONFIG)
    first = _by_kind(requests, FIRST_CALL)
    assert len(first) == 1 and first[0].measured
    assert sum(r.request.adapter == CONFIG.first_call_name for r in requests) == 1


def test_trace_is_in_arrival_order_with_indices_and_is_reproducible():
    requests = generate_coldstart_trace(CONFIG)
    assert [r.request.arrival_s for r in requests] == sorted(r.request.arrival_s for r in requests)
    assert [r.request.index for r in requests] == list(range(len(requests)))
    assert generate_coldstart_trace(CONFIG) == requests
    assert generate_coldstart_trace(ColdStartTraceConfig(seed=4)) != generate_coldstart_trace(
        ColdStartTraceConfig(seed=5)
    )


def test_bad_trace_settings_are_refused():
    with pytest.raises(ValueError, match="jitter_share"):
        ColdStartTraceConfig(jitter_share=0.5)
    with pytest.raises(ValueError, match="tail"):
        ColdStartTraceConfig(tail="bursty")


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


def test_inter_token_gaps_overlapping_another_requests_load_or_a_prefetch_count_as_during_loads():
    # Request 0 decodes from t=1.0 s with 100 ms gaps: [1.0,1.1], [1.1,1.2], [1.2,1.3], [1.3,1.4].
    decoding = _record(0, 0.0, 1000.0, [100.0, 100.0, 100.0, 100.0])
    # Request 1 arrives at 1.15 s, waits 100 ms for its adapter, loaded during [1.15, 1.25].
    loading = _record(1, 1.15, 200.0, [], tier="disk", load_ms=100.0, queue_ms=100.0)
    assert load_window_s(loading) == pytest.approx((1.15, 1.25))
    during, idle, num_windows = split_itl_by_loads([decoding, loading])
    assert num_windows == 1 and len(during) == 2 and len(idle) == 2
    # A hint-driven prefetch during [1.32, 1.35] (no request waited for it) adds the last gap.
    during, idle, num_windows = split_itl_by_loads([decoding, loading], [(1.32, 1.35)])
    assert num_windows == 2 and len(during) == 3 and len(idle) == 1


def test_prefetches_logged_by_the_worker_become_windows_on_the_replay_clock():
    log = (
        "2026-11-30 10:00:05,250 DEBUG data_plane.engine.llm_engine: adapter load cause=prefetch tier=disk "
        "to=host key=abcdef012345 read_ms=40.0 copy_ms=10.0\n"
        "2026-11-30 10:00:06,000 DEBUG data_plane.engine.llm_engine: adapter load cause=request tier=host "
        "to=slot key=abcdef012345 read_ms=0.0 copy_ms=3.0\n"
        "2026-11-30 10:00:06,100 INFO data_plane.server: something else\n"
    )
    loads = worker_loads(log)
    assert [(x["cause"], x["tier"], x["to"], x["ms"]) for x in loads] == [
        ("prefetch", "disk", "host", 50.0),
        ("request", "host", "slot", 3.0),
    ]
    t0 = datetime(2026, 11, 30, 10, 0, 0).timestamp()  # the replay started at 10:00:00 local time
    assert prefetch_windows_s(loads, t0) == [pytest.approx((5.2, 5.25))]


def test_prefetch_counters_are_summed_over_tiers_and_absent_ones_are_none():
    text = (
        "# HELP openlora_prefetch_total Prefetch loads performed\n# TYPE openlora_prefetch_total counter\n"
        'openlora_prefetch_total{tier="host"} 18.0\nopenlora_prefetch_total{tier="device"} 2.0\n'
        'openlora_prefetch_wasted_total{tier="host"} 1.0\nopenlora_prefetch_wasted_total{tier="device"} 0.0\n'
        'openlora_prefetch_skipped_total{reason="held"} 7.0\n'
    )
    assert prefetch_counts(text) == {"total": 20, "wasted": 1, "wasted_share": pytest.approx(0.05)}
    assert prefetch_counts('openlora_requests_total{status="ok"} 3.0\n') is None
    assert prefetch_counts("") is None


def test_deciles_rank_adapters_by_measured_requests():
    requests = generate_coldstart_trace(CONFIG)
    records = [
        _record(r.request.index, r.request.arrival_s, 10.0 if r.kind == POPULAR else 30.0, [5.0])
        for r in requests
    ]
    deciles = popularity_deciles(requests, records)
    assert [d["decile"] for d in deciles] == list(range(1, 11))
    assert sum(d["adapters"] for d in deciles) == CONFIG.num_adapters
    assert sum(d["requests"] for d in deciles) == sum(r.measured for r in requests)
    # The 5 popular adapters (of 18) fill the first deciles; the long tail's slower calls the last.
    assert deciles[0]["ttft_ms"]["p50"] == 10.0 and deciles[-1]["ttft_ms"]["p50"] == 30.0
    assert deciles[0]["requests"] > deciles[-1]["requests"]


def test_targets_depend_on_the_tail_and_the_host_share():
    config = ColdStartTraceConfig(num_popular=2, popular_rate_per_s=2.0, num_long_tail=2, hour_s=4.0)
    requests = generate_coldstart_trace(config)
    records = []
    for r in requests:
        tier = "disk" if r.kind == LONG_TAIL and r.hour == config.num_hours - 1 else "device"
        records.append(_record(r.request.index, r.request.arrival_s, 100.0, [20.0, 20.0], tier=tier))
    figures = analyze(requests, records)
    # Long tail: 2 adapters x 4 measured hours, the last hour's 2 calls from disk -> 75% warm.
    assert figures[LONG_TAIL]["requests"] == 8
    assert figures[LONG_TAIL]["warm_share"] == pytest.approx(0.75)
    assert figures[LONG_TAIL]["tier_shares"] == {"device": 0.75, "host": 0.0, "disk": 0.25, "remote": 0.0}
    periodic = targets(figures, PERIODIC, 0.7)
    assert not periodic["long_tail_warm_share"]["met"]  # 0.75 < 0.90
    assert targets(figures, POISSON, 0.7)["long_tail_warm_share"]["met"]  # 0.75 >= the host share
    assert periodic["long_tail_ttft_p99_vs_popular"]["met"]
    assert periodic["warm_long_tail_ttft_p50_minus_popular_ms"]["value"] == 0.0
    assert not periodic["wasted_prefetch_share"]["met"]  # no counters: not met
    counted = targets(figures, PERIODIC, 0.7, {"total": 20, "wasted": 1, "wasted_share": 0.05})
    assert counted["wasted_prefetch_share"]["met"]


def test_each_pass_runs_openlora_up_with_flags_its_parsers_accept(tmp_path):
    from openlora.cli import build_parser
    from openlora.commands.serving import up_config_from_args
    from openlora.config import ControlPlaneSettings

    cfg = ColdStartConfig()
    assert cfg.num_host_adapters == 6 + 14  # the popular adapters and 70% of the 20 long-tail ones
    for hints_on in (True, False):
        argv = up_argv(
            cfg, hints_on, "postgresql://h/db", "redis://h:1/0", tmp_path / "m", tmp_path, 12345, 9
        )
        assert argv[1:4] == ["-m", "openlora.cli", "up"]
        up = up_config_from_args(build_parser().parse_args(argv[3:]), {})
        worker = build_parser().parse_args(["worker", "--model", "m", *up.worker_args])
        assert (worker.num_adapter_slots, worker.host_cache_bytes, worker.metrics_port) == (8, 12345, 9)
        control_plane = build_parser().parse_args(["control-plane", *up.control_plane_args])
        settings = ControlPlaneSettings.resolve(vars(control_plane), {"OPENLORA_WORKER_TOKEN": "t" * 20})
        if hints_on:
            assert settings.predictor_interval_s == 0.5
            assert (settings.predictor.lead_s, settings.predictor.resident_rate_per_s) == (2.0, 0.2)
        else:
            assert settings.predictor_interval_s == 0


def test_full_run_has_four_passes_and_quick_two():
    full, quick = config_from_args([]), config_from_args(["--quick"])
    assert [pass_label(*p) for p in full.passes] == [
        "periodic, hints on", "periodic, hints off", "poisson, hints on", "poisson, hints off",
    ]  # fmt: skip
    assert {tail for tail, _ in quick.passes} == {PERIODIC, POISSON}
    assert {on for _, on in quick.passes} == {True, False}
    assert not quick.update_results_md and Path(full.results_dir).name == "results"
    # Full run: 8 hours of 8 s per pass.
    assert full.trace.duration_s == 64.0


def test_time_scale_stretches_the_clock_and_the_predictor_alike(tmp_path):
    from openlora.cli import build_parser
    from openlora.commands.serving import up_config_from_args
    from openlora.config import ControlPlaneSettings

    base = config_from_args([])
    slow = config_from_args(["--time-scale", "2.5", "--tail", "poisson", "--measured-hours", "6"])
    assert slow.trace.hour_s == pytest.approx(2.5 * base.trace.hour_s)
    assert slow.trace.popular_rate_per_s == pytest.approx(base.trace.popular_rate_per_s / 2.5)
    assert slow.trace.num_measured_hours == 6 and slow.trace.num_history_hours == base.trace.num_history_hours
    assert [pass_label(*p) for p in slow.passes] == ["poisson, hints on", "poisson, hints off"]
    # The same number of calls per (stretched) hour: the trace's shape is unchanged.
    fast_calls = len(generate_coldstart_trace(replace(base.trace, tail=POISSON, num_measured_hours=6)))
    slow_calls = len(generate_coldstart_trace(replace(slow.trace, tail=POISSON)))
    assert abs(slow_calls - fast_calls) <= 0.1 * fast_calls
    argv = up_argv(slow, True, "postgresql://h/db", "redis://h:1/0", tmp_path / "m", tmp_path, 1, 9)
    up = up_config_from_args(build_parser().parse_args(argv[3:]), {})
    control_plane = build_parser().parse_args(["control-plane", *up.control_plane_args])
    settings = ControlPlaneSettings.resolve(vars(control_plane), {"OPENLORA_WORKER_TOKEN": "t" * 20})
    assert settings.predictor_interval_s == pytest.approx(1.25)
    assert settings.predictor.lead_s == pytest.approx(5.0)
    assert settings.predictor.rate_time_constant_s == pytest.approx(75.0)
    assert settings.predictor.resident_rate_per_s == pytest.approx(0.08)
    for bad in (["--time-scale", "0"], ["--time-scale", "nan"], ["--measured-hours", "0"], ["--tail", "x"]):
        with pytest.raises(SystemExit):
            config_from_args(bad)


def test_seed_draws_another_trace_of_the_same_shape():
    base, other = (
        config_from_args(["--tail", "poisson"]),
        config_from_args(["--tail", "poisson", "--seed", "3"]),
    )
    assert base.trace.seed == 0 and other.trace.seed == 3
    assert replace(other.trace, seed=0) == base.trace  # nothing else changes
    first = generate_coldstart_trace(replace(base.trace, tail=POISSON))
    second = generate_coldstart_trace(replace(other.trace, tail=POISSON))
    assert [r.request.arrival_s for r in first] != [r.request.arrival_s for r in second]
    assert abs(len(first) - len(second)) <= 0.2 * len(first)
    assert config_from_args(["--seed", "3", "--measured-hours", "2"]).trace.num_measured_hours == 2
    with pytest.raises(SystemExit):
        config_from_args(["--seed", "-1"])


def test_bootstrap_interval_covers_the_statistic_and_narrows_with_more_samples():
    rng = np.random.default_rng(1)
    gap = lambda a, b: np.percentile(a, 50) - np.percentile(b, 50)  # noqa: E731
    small = bootstrap_interval(rng.normal(45, 12, 60), rng.normal(40, 12, 40), gap)
    large = bootstrap_interval(rng.normal(45, 12, 2000), rng.normal(40, 12, 2000), gap)
    assert small[0] < 5.0 < small[1] and large[0] < 5.0 < large[1]
    assert large[1] - large[0] < 0.4 * (small[1] - small[0])
    assert bootstrap_interval(np.array([]), np.array([1.0]), gap) is None


def test_label_permutations_tell_a_slower_group_from_the_luck_of_the_deal():
    rng = np.random.default_rng(2)
    ratio = lambda a, b: float(np.percentile(a, 99) / np.percentile(b, 99))  # noqa: E731
    same = label_permutations(rng.gamma(4.0, 10.0, 94), rng.gamma(4.0, 10.0, 49), ratio, 1.2)
    assert same["sizes"] == [94, 49] and 0.8 < same["median"] < 1.25
    assert same["p_value"] > 0.05  # one distribution: no evidence either way
    assert 0.0 < same["share_at_or_above_target"] < 0.9  # a p99 of ~50 calls misses 1.2 by chance at times
    slower = label_permutations(rng.gamma(4.0, 10.0, 400) * 1.6, rng.gamma(4.0, 10.0, 400), ratio, 1.2)
    assert slower["observed"] > 1.3 and slower["p_value"] < 0.01
    assert label_permutations(np.array([]), np.array([1.0]), ratio, 1.2) is None


def test_failed_calls_count_against_the_targets_instead_of_leaving_their_statistics():
    config = ColdStartTraceConfig(num_popular=2, popular_rate_per_s=2.0, num_long_tail=2, hour_s=4.0)
    requests = generate_coldstart_trace(config)
    records = [
        _record(r.request.index, r.request.arrival_s, 100.0, [20.0, 20.0], tier="host") for r in requests
    ]
    met = targets(analyze(requests, records), PERIODIC, 0.7)
    assert all(t["met"] for key, t in met.items() if key != "wasted_prefetch_share")
    # Two of the 8 measured long-tail calls fail (a timeout, a worker gone): the 6 served are as fast as
    # the popular ones and all warm, yet a quarter of the tail was not served at all.
    failed = [r for r in requests if r.kind == LONG_TAIL and r.measured][:2]
    for r in failed:
        records[r.request.index] |= {"error": "DEADLINE_EXCEEDED", "ttft_ms": None, "cache_tier": ""}
    figures = analyze(requests, records)
    assert figures[LONG_TAIL]["errors"] == 2 and figures[LONG_TAIL]["warm_share"] == 1.0
    checked = targets(figures, PERIODIC, 0.7)
    assert checked["long_tail_warm_share"]["value"] == pytest.approx(0.75)
    assert not checked["long_tail_warm_share"]["met"]
    for key in ("long_tail_ttft_p99_vs_popular", "warm_long_tail_ttft_p50_minus_popular_ms"):
        assert checked[key]["failed_calls"] == 2 and not checked[key]["met"]


def test_targets_carry_the_passes_bootstrap_intervals():
    config = ColdStartTraceConfig(num_popular=2, popular_rate_per_s=4.0, num_long_tail=4, hour_s=4.0)
    requests = generate_coldstart_trace(config)
    rng = np.random.default_rng(0)
    records = [
        _record(r.request.index, r.request.arrival_s, float(rng.uniform(30, 60)) + (8 if r.kind == LONG_TAIL else 0),
                [20.0, 20.0], tier="host")
        for r in requests
    ]  # fmt: skip
    checked = targets(analyze(requests, records), POISSON, 0.7)
    gap = checked["warm_long_tail_ttft_p50_minus_popular_ms"]
    assert gap["ci95"][0] <= gap["value"] <= gap["ci95"][1]
    ratio = checked["long_tail_ttft_p99_vs_popular"]
    assert ratio["ci95"][0] <= ratio["value"] <= ratio["ci95"][1]
    assert ratio["by_chance"]["observed"] == pytest.approx(ratio["value"])
    assert ratio["by_chance"]["sizes"][0] > 0 and 0.0 <= ratio["by_chance"]["p_value"] <= 1.0
    assert any("dealt out at random" in line for line in target_lines({"targets": {POISSON: checked}}))


def _event(at_s, event, key="k"):
    return {"at_s": at_s, "event": event, "key": key}


def test_why_cold_names_the_last_thing_that_took_a_hinted_adapter_away():
    hint = [{"key": "k", "issued_at": 100.0}]
    calls = [("k", 105.0, 90.0)]
    assert why_cold(calls, [], []) == ["no_hint"]
    assert why_cold(calls, [{"key": "k", "issued_at": 80.0}], []) == ["no_hint"]  # before the previous call
    assert why_cold(calls, [{"key": "other", "issued_at": 100.0}], []) == ["no_hint"]
    assert why_cold(calls, hint, [_event(105.5, "hint")]) == ["hint_late"]  # the worker took it after
    received = [_event(100.2, "hint")]
    assert why_cold(calls, hint, [*received, _event(100.2, "skipped_no_room")]) == ["skipped_no_room"]
    started = [*received, _event(100.2, "prefetch_started")]
    assert why_cold(calls, hint, started) == ["prefetch_in_flight"]
    loaded = [*started, _event(100.3, "prefetch_loaded")]
    assert why_cold(calls, hint, loaded) == ["unexplained"]
    assert why_cold(calls, hint, [*started, _event(100.3, "host_declined")]) == ["host_declined"]
    evicted = [*loaded, _event(103.0, "host_evicted")]
    assert why_cold(calls, hint, evicted) == ["evicted_from_host"]
    assert why_cold(calls, hint, [*evicted, _event(106.0, "left_slot")]) == ["evicted_from_host"]  # after
    held = [*received, _event(100.2, "skipped_held"), _event(104.0, "left_slot")]
    assert why_cold(calls, hint, held) == ["left_slot"]
    assert why_cold(calls, hint, [*evicted, _event(104.0, "left_slot", key="other")]) == ["evicted_from_host"]


def test_cold_calls_are_the_measured_long_tail_calls_not_served_warm_with_their_previous_call():
    requests = generate_coldstart_trace(CONFIG)
    tiers = ["disk", "host", "remote", "device"]
    records = [
        {"index": r.request.index, "scheduled_s": r.request.arrival_s, "send_lag_ms": 10.0,
         "cache_tier": tiers[r.request.index % 4], "error": None}
        for r in requests
    ]  # fmt: skip
    key_of = {name: f"key-{name}" for name in {r.request.adapter for r in requests}}
    calls = cold_calls(requests, records, 1000.0, key_of)
    expected = [r for r in requests if r.kind == LONG_TAIL and r.measured and r.request.index % 4 in (0, 2)]
    assert [c[0] for c in calls] == [key_of[r.request.adapter] for r in expected]
    assert [c[1] for c in calls] == [pytest.approx(1000.01 + r.request.arrival_s) for r in expected]
    for (_, _, previous), r in zip(calls, expected, strict=True):
        before = _tail_times(requests, r.request.adapter)
        before = before[before < r.request.arrival_s]
        assert previous == pytest.approx(1000.01 + before[-1])  # measured calls have history before them
