"""The periodicity check: an hourly job with minutes of jitter is periodic, memoryless calls are not.

Calls at random times (a Poisson process) often put their few gaps near a grid of their median gap; each
prewarm such a false period earns is a load that nothing uses. `periodic_significance` bounds how often
that may happen; these tests check the bound against simulated memoryless traffic and that jittered
periodic traffic still passes it.
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
    assert period_of(times, PredictorConfig(periodic_significance=1.0)) == pytest.approx(HOUR)
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
    assert false_periods / trials <= config.periodic_significance + 0.015


@pytest.mark.parametrize("num_calls", [4, 5, 6])
def test_without_the_check_a_few_memoryless_calls_often_look_periodic(num_calls):
    # With few gaps, the share on the grid alone lets random calls through: the check keeps them out.
    trials = 3000
    counts = []
    for significance in (1.0, PredictorConfig().periodic_significance):
        rng = random.Random(7 + num_calls)
        config = PredictorConfig(periodic_significance=significance)
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
            PredictorConfig(periodic_significance=bad)
