import math

import numpy as np
import pytest

from benchmarks.trace import (
    FIRST_PROMPT_TOKEN_ID,
    TraceConfig,
    adapter_name,
    generate_trace,
    popularity,
    read_trace,
    write_trace,
)


def _gaps_s(trace):
    arrivals = np.array([r.arrival_s for r in trace.requests])
    return np.diff(arrivals)


def test_same_seed_gives_the_same_trace_and_another_seed_a_different_one():
    config = TraceConfig(num_requests=200, num_adapters=50, rate_per_s=4.0, seed=7)
    assert generate_trace(config) == generate_trace(config)
    other = generate_trace(TraceConfig(num_requests=200, num_adapters=50, rate_per_s=4.0, seed=8))
    assert other.requests != generate_trace(config).requests


def test_gamma_interarrival_mean_and_cv_match_the_config_over_a_large_sample():
    for cv in (0.5, 1.0, 2.0):
        trace = generate_trace(
            TraceConfig(num_requests=40_000, num_adapters=1, rate_per_s=5.0, cv=cv, seed=1)
        )
        gaps = _gaps_s(trace)
        assert gaps.mean() == pytest.approx(1 / 5.0, rel=0.03)
        assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)
        assert (gaps >= 0).all()


def test_zero_cv_gives_evenly_spaced_arrivals():
    gaps = _gaps_s(generate_trace(TraceConfig(num_requests=50, num_adapters=1, rate_per_s=10.0, cv=0.0)))
    assert np.allclose(gaps, 0.1)


def test_offline_trace_puts_every_arrival_at_zero():
    trace = generate_trace(TraceConfig(num_requests=64, num_adapters=4))
    assert trace.config.offline
    assert all(r.arrival_s == 0.0 for r in trace.requests)


def test_adapter_popularity_follows_the_power_law_over_ranks():
    alpha, num_adapters = 1.2, 20
    trace = generate_trace(TraceConfig(num_requests=60_000, num_adapters=num_adapters, alpha=alpha, seed=3))
    counts = np.array(
        [sum(1 for r in trace.requests if r.adapter == adapter_name(k)) for k in range(num_adapters)]
    )
    frequencies = counts / counts.sum()
    assert np.allclose(frequencies, popularity(num_adapters, alpha), atol=0.01)
    # log-log slope of frequency against rank is -alpha
    slope = np.polyfit(np.log(np.arange(1, 11)), np.log(frequencies[:10]), 1)[0]
    assert slope == pytest.approx(-alpha, abs=0.1)
    assert counts[0] > counts[1] > counts[4] > counts[19]


def test_alpha_zero_is_uniform_popularity():
    assert np.allclose(popularity(8, 0.0), 1 / 8)


def test_lengths_and_token_ids_stay_in_their_ranges():
    config = TraceConfig(
        num_requests=500, num_adapters=3, prompt_len_range=(5, 9), output_len_range=(2, 4), vocab_size=100
    )
    trace = generate_trace(config)
    assert {len(r.prompt_token_ids) for r in trace.requests} == set(range(5, 10))
    assert {r.max_tokens for r in trace.requests} == {2, 3, 4}
    assert all(FIRST_PROMPT_TOKEN_ID <= t < 100 for r in trace.requests for t in r.prompt_token_ids)


def test_zero_adapters_means_every_request_uses_the_base_model():
    trace = generate_trace(TraceConfig(num_requests=10, num_adapters=0))
    assert all(r.adapter == "" for r in trace.requests)
    assert trace.adapters_used == []


def test_jsonl_round_trip_preserves_config_and_requests(tmp_path):
    for rate in (math.inf, 2.5):
        trace = generate_trace(TraceConfig(num_requests=30, num_adapters=5, rate_per_s=rate, cv=2.0, seed=11))
        path = tmp_path / f"trace-{rate}.jsonl"
        write_trace(trace, path)
        assert read_trace(path) == trace


def test_invalid_config_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="rate_per_s"):
        TraceConfig(num_requests=1, num_adapters=1, rate_per_s=0)
    with pytest.raises(ValueError, match="output_len_range"):
        TraceConfig(num_requests=1, num_adapters=1, output_len_range=(4, 2))


def test_cover_all_adapters_requests_each_adapter_at_least_once():
    trace = generate_trace(
        TraceConfig(num_requests=300, num_adapters=250, alpha=1.0, cover_all_adapters=True, seed=5)
    )
    assert len(trace.adapters_used) == 250
    assert len(trace.requests) == 300
    with pytest.raises(ValueError, match="cover_all_adapters"):
        TraceConfig(num_requests=10, num_adapters=11, cover_all_adapters=True)


def test_traces_that_differ_in_adapters_or_rate_share_lengths_and_prompts():
    base = dict(prompt_len_range=(4, 30), output_len_range=(16, 64), seed=9)
    one = generate_trace(TraceConfig(num_requests=300, num_adapters=1, **base))
    many = generate_trace(TraceConfig(num_requests=300, num_adapters=1000, cover_all_adapters=False, **base))
    paced = generate_trace(TraceConfig(num_requests=300, num_adapters=1000, rate_per_s=3.0, **base))
    longer = generate_trace(TraceConfig(num_requests=500, num_adapters=1, **base))
    for other in (many, paced, longer):
        assert [r.max_tokens for r in other.requests[:300]] == [r.max_tokens for r in one.requests]
        assert [r.prompt_token_ids for r in other.requests[:300]] == [
            r.prompt_token_ids for r in one.requests
        ]
    assert {r.adapter for r in one.requests} == {adapter_name(0)}
    assert len({r.adapter for r in many.requests}) > 100
    assert len({r.max_tokens for r in one.requests}) > 40
