"""The significance check: an hourly job with minutes of jitter is periodic and a real burst is a burst,
while memoryless calls are neither.

Calls at random times (a Poisson process) often put their few gaps near a grid of their median gap, or
twice their usual number of calls into one window; each prewarm such a false pattern earns is a load that
nothing uses, and a protected copy that pushes out one that would have been used. `significance` bounds
how often that may happen; these tests check the bound against simulated memoryless traffic and that
jittered periodic traffic and real bursts still pass it.
"""

from __future__ import annotations

import random

import pytest

from control_plane.prediction.demand import PredictorConfig, grid_chance, period_of, predict

HOUR = 3600.0
T0 = 1_900_000_000.0


def _hourly(num_calls: int, jitter_s: float, rng: random.Random) -> list[float]:
    return [T0 + i * HOUR + rng.uniform(-jitter_s, jitter_s) for i in range(num_calls)]


def _poisson(num_calls: int, rng: random.Random) -> list[float]:
    times = [T0]
    for _ in range(num_calls - 1):
        times.append(times[-1] + rng.expovariate(1 / HOUR))
    return times


def test_random_calls_that_happen_to_line_up_are_not_a_period():
    # Gaps 1.0, 0.8 and 1.2 hours: all within the default tolerance (a quarter period) of the grid, as
    # random calls one hour apart on average are one time in eight.
    times = [T0, T0 + HOUR, T0 + 1.8 * HOUR, T0 + 3.0 * HOUR]
    assert period_of(times, PredictorConfig(significance=1.0)) == pytest.approx(HOUR)
    assert period_of(times, PredictorConfig()) is None
    prediction = predict(times, T0 + 3.9 * HOUR, PredictorConfig())
    assert prediction is None or prediction.reason != "periodic"


def test_an_hourly_job_with_minutes_of_jitter_is_periodic_after_four_calls():
    times = [T0, T0 + HOUR + 120, T0 + 2 * HOUR - 120, T0 + 3 * HOUR + 60]  # gaps off the hour by 2-4 min
    assert period_of(times, PredictorConfig()) is not None
    prediction = predict(times, T0 + 3.9 * HOUR, PredictorConfig())
    assert prediction is not None and prediction.reason == "periodic" and prediction.kind == "prewarm"


def test_a_missed_run_does_not_hide_the_period():
    times = [T0, T0 + HOUR + 120, T0 + 2 * HOUR - 60, T0 + 4 * HOUR + 90, T0 + 5 * HOUR]  # hour 3 skipped
    assert period_of(times, PredictorConfig()) == pytest.approx(HOUR, rel=0.05)


def test_grid_chance_is_one_without_evidence_and_falls_with_tighter_or_more_gaps():
    assert grid_chance(3, 0, 0.1) == pytest.approx(1.0)
    assert grid_chance(2, 2, 0.05) < grid_chance(2, 2, 0.1) < grid_chance(2, 2, 0.25)
    assert grid_chance(6, 6, 0.1) < grid_chance(3, 3, 0.1)
    assert grid_chance(6, 5, 0.1) > grid_chance(6, 6, 0.1)


@pytest.mark.parametrize("num_calls", [4, 5, 6, 8, 12])
def test_memoryless_calls_are_taken_for_periodic_at_most_about_as_often_as_the_significance_allows(num_calls):
    rng = random.Random(7 + num_calls)
    config = PredictorConfig()
    trials = 3000
    false_periods = sum(period_of(_poisson(num_calls, rng), config) is not None for _ in range(trials))
    # The bound is per check; binomial noise of 3000 trials at 5% is about 0.4 points.
    assert false_periods / trials <= config.significance + 0.015


@pytest.mark.parametrize("num_calls", [4, 5, 6])
def test_without_the_check_a_few_memoryless_calls_often_look_periodic(num_calls):
    # With few gaps, the share on the grid alone lets random calls through: the check keeps them out.
    trials = 3000
    counts = []
    for significance in (1.0, PredictorConfig().significance):
        rng = random.Random(7 + num_calls)
        config = PredictorConfig(significance=significance)
        counts.append(sum(period_of(_poisson(num_calls, rng), config) is not None for _ in range(trials)))
    loose, checked = counts
    assert loose / trials >= 0.08 and checked < loose / 1.5


@pytest.mark.parametrize("num_calls", [5, 6, 8])
def test_hourly_calls_with_up_to_five_minutes_of_jitter_are_found_periodic(num_calls):
    rng = random.Random(11 + num_calls)
    config = PredictorConfig()
    trials = 1000
    found = sum(period_of(_hourly(num_calls, 300.0, rng), config) is not None for _ in range(trials))
    assert found / trials >= 0.97


def test_significance_must_be_a_probability():
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            PredictorConfig(significance=bad)


def test_twice_the_usual_calls_in_a_window_by_chance_is_no_burst():
    # About 2 calls per 600 s window (one per 280 s, at irregular times), then 5 in one window: more than
    # twice the pace, which memoryless calls at that pace still do about 16% of the time.
    config = PredictorConfig(significance=0.05)
    times = [T0 + t for t in (0, 250, 610, 880, 1230, 1500, 1790, 2100, 2420)]
    times += [times[-1] + 300 + d for d in (0, 110, 220, 330, 440)]
    now = times[-1] + 10
    prediction = predict(times, now, config)
    assert prediction is None or prediction.reason != "burst"
    loose = predict(times, now, PredictorConfig(significance=1.0))
    assert loose is not None and loose.reason == "burst"


def test_a_real_burst_is_still_a_burst():
    # About one call an hour at irregular times for a day, then six within ten minutes: memoryless calls
    # at that pace would almost never.
    gaps = [0.4, 1.7, 0.9, 2.6, 0.6, 1.3, 2.2, 0.5, 1.1, 3.0, 0.7, 1.9, 0.8, 1.5, 2.4, 0.45, 1.2]
    times = [T0]
    for gap in gaps:
        times.append(times[-1] + gap * HOUR)
    times += [times[-1] + HOUR + i * 100.0 for i in range(6)]
    prediction = predict(times, times[-1] + 20, PredictorConfig())
    assert prediction is not None and prediction.kind == "prewarm" and prediction.reason == "burst"
