import math

import pytest

from benchmarks.capacity import (
    COVER_SHARE,
    AdapterSchedule,
    CapacitySearch,
    SearchConfig,
    find_capacity,
    is_sustained,
    step_trace,
)
from benchmarks.trace import TraceConfig, adapter_name


def _queue_like_p99(threshold_per_s: float, bound_ms: float):
    """A synthetic p99(rate) that grows like a queue's and crosses `bound_ms` exactly at `threshold_per_s`."""

    def measure(index: int, rate: float) -> dict:
        # p99 = c / (capacity - rate) with capacity 1.25 x the threshold; chosen so p99(threshold) == bound.
        capacity = 1.25 * threshold_per_s
        c = bound_ms * (capacity - threshold_per_s)
        p99 = c / (capacity - rate) if rate < capacity else 1e9
        measure.calls.append((index, rate))
        return {"errors": 0, "ttft_ms": {"p99": p99}}

    measure.calls = []
    return measure


@pytest.mark.parametrize("threshold", [0.7, 3.0, 9.0, 41.0])
@pytest.mark.parametrize("start_fraction", [0.3, 0.97, 1.04, 3.0])
def test_search_brackets_a_known_threshold_within_its_precision(threshold, start_fraction):
    measure = _queue_like_p99(threshold, bound_ms=1000.0)
    start = start_fraction * threshold
    config = SearchConfig(start_rate_per_s=start, ttft_p99_bound_ms=1000.0, growth=1.3, num_steps=12)
    capacity = find_capacity(measure, config)
    assert capacity.bracketed
    assert capacity.rate_per_s <= threshold < capacity.failed_rate_per_s
    # From within 1.3 ** 5 of the threshold, 12 steps leave at least 3 bisections: the bracket is within
    # 1.3 ** (1/8).
    assert capacity.failed_rate_per_s / capacity.rate_per_s <= 1.3 ** (1 / 8) + 1e-9
    assert [i for i, _ in measure.calls] == list(range(12))
    assert len(capacity.steps) == 12
    assert all(step.sustained == (step.rate_per_s <= threshold) for step in capacity.steps)


def test_search_grows_geometrically_then_bisects():
    measure = _queue_like_p99(10.0, bound_ms=1000.0)
    capacity = find_capacity(measure, SearchConfig(start_rate_per_s=4.0, growth=2.0, num_steps=4))
    rates = [rate for _, rate in measure.calls]
    # 4 ok, 8 ok, 16 fails, then the geometric mean of 8 and 16
    assert rates == pytest.approx([4.0, 8.0, 16.0, math.sqrt(8.0 * 16.0)])
    assert capacity.rate_per_s == pytest.approx(8.0)
    assert capacity.failed_rate_per_s == pytest.approx(math.sqrt(8.0 * 16.0))


def test_search_that_never_fails_reports_an_unbracketed_lower_bound():
    measure = _queue_like_p99(1000.0, bound_ms=1000.0)
    capacity = find_capacity(measure, SearchConfig(start_rate_per_s=1.0, growth=2.0, num_steps=3))
    assert capacity.rate_per_s == pytest.approx(4.0)
    assert capacity.failed_rate_per_s is None and not capacity.bracketed


def test_search_that_never_sustains_walks_down_and_reports_zero():
    measure = _queue_like_p99(0.1, bound_ms=1000.0)
    capacity = find_capacity(measure, SearchConfig(start_rate_per_s=8.0, growth=2.0, num_steps=3))
    assert [rate for _, rate in measure.calls] == pytest.approx([8.0, 4.0, 2.0])
    assert capacity.rate_per_s == 0.0 and not capacity.bracketed
    assert capacity.failed_rate_per_s == pytest.approx(2.0)


def test_interleaved_searches_find_what_each_finds_alone():
    config = SearchConfig(start_rate_per_s=3.0, growth=1.3, num_steps=6)
    fast, slow = _queue_like_p99(7.0, 1000.0), _queue_like_p99(4.5, 1000.0)
    alone = [find_capacity(fast, config), find_capacity(slow, config)]
    searches = [
        (CapacitySearch(config), _queue_like_p99(7.0, 1000.0)),
        (CapacitySearch(config), _queue_like_p99(4.5, 1000.0)),
    ]
    for index in range(config.num_steps):
        for search, measure in searches if index % 2 == 0 else searches[::-1]:
            search.record(measure(index, search.next_rate()))
    assert [search.result() for search, _ in searches] == alone
    assert all(search.done for search, _ in searches)
    with pytest.raises(ValueError, match="steps"):
        searches[0][0].record({"errors": 0, "ttft_ms": {"p99": 1.0}})


def test_a_step_with_errors_or_no_completed_request_is_not_sustained():
    assert is_sustained({"errors": 0, "ttft_ms": {"p99": 999.0}}, 1000.0)
    assert not is_sustained({"errors": 0, "ttft_ms": {"p99": 1000.5}}, 1000.0)
    assert not is_sustained({"errors": 1, "ttft_ms": {"p99": 10.0}}, 1000.0)
    assert not is_sustained({"errors": 0, "ttft_ms": {"p99": None}}, 1000.0)


def test_invalid_search_config_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="growth"):
        SearchConfig(start_rate_per_s=1.0, growth=1.0)
    with pytest.raises(ValueError, match="start_rate_per_s"):
        SearchConfig(start_rate_per_s=0.0)
    with pytest.raises(ValueError, match="num_steps"):
        SearchConfig(start_rate_per_s=1.0, num_steps=0)


def test_schedule_requests_every_adapter_over_the_steps_with_power_law_over_the_rest():
    schedule = AdapterSchedule(num_adapters=1000, alpha=1.0, num_steps=5, seed=3)
    steps = []
    for _ in range(5):
        n = max(150, schedule.min_requests())
        names = schedule.next_step(n)
        assert len(names) == n
        steps.append(names)
    requested = {name for names in steps for name in names}
    assert requested == {adapter_name(i) for i in range(1000)}
    assert len(schedule.requested) == 1000
    # Each step requests its even share of the adapters not yet requested, at most COVER_SHARE of it.
    assert all(len(names) >= math.ceil(200 / COVER_SHARE) for names in steps)
    counts = {}
    for names in steps:
        for name in names:
            counts[name] = counts.get(name, 0) + 1
    # The requests beyond one per adapter follow the power law: the head adapter gets the most of them.
    assert counts[adapter_name(0)] == max(counts.values()) and counts[adapter_name(0)] > 10


def test_schedule_refuses_a_step_too_short_for_its_coverage_quota():
    schedule = AdapterSchedule(num_adapters=100, alpha=1.0, num_steps=2, seed=0)
    assert schedule.cover_quota() == 50
    with pytest.raises(ValueError, match="num_requests"):
        schedule.next_step(49)


def test_step_traces_differ_across_configurations_only_in_their_adapters():
    base = TraceConfig(num_requests=0, num_adapters=0, output_len_range=(16, 64), seed=21)
    one = AdapterSchedule(1, 1.0, 3, seed=2)
    many = AdapterSchedule(1000, 1.0, 3, seed=2)
    a = step_trace(base, 4.0, one.next_step(400), 1)
    b = step_trace(base, 4.0, many.next_step(400), 1000)
    assert [r.max_tokens for r in a.requests] == [r.max_tokens for r in b.requests]
    assert [r.prompt_token_ids for r in a.requests] == [r.prompt_token_ids for r in b.requests]
    assert [r.arrival_s for r in a.requests] == [r.arrival_s for r in b.requests]
    assert {r.adapter for r in a.requests} == {adapter_name(0)}
    assert len({r.adapter for r in b.requests}) > 300
    assert b.config.num_adapters == 1000 and b.config.rate_per_s == 4.0
    # At another rate the same step keeps its lengths and scales its arrivals.
    c = step_trace(base, 8.0, AdapterSchedule(1, 1.0, 3, seed=2).next_step(400), 1)
    assert [r.max_tokens for r in c.requests] == [r.max_tokens for r in a.requests]
    assert [r.arrival_s for r in c.requests] == pytest.approx([r.arrival_s / 2 for r in a.requests])
