"""A periodic prediction stops when its calls stop: after one missed call the next one on the grid is
still prewarmed (a job that skips a run); after two missed in a row no more prewarms are published on
that grid, so a stopped job, or gaps that only looked periodic, do not cost a wasted load every period.
And a jittered period is prewarmed as early as its calls have strayed from the grid."""

from __future__ import annotations

from control_plane.prediction.demand import MAX_MISSED_CALLS, PredictorConfig, predict

CONFIG = PredictorConfig(rate_time_constant_s=60.0, lead_s=2.0, resident_rate_per_s=0.5)
T0 = 1_900_000_000.0
PERIOD = 10.0


def _prewarm_deadline(times, now):
    prediction = predict(times, now, CONFIG)
    return prediction.deadline_at if prediction is not None and prediction.kind == "prewarm" else None


def test_a_periodic_adapter_is_prewarmed_after_one_missed_call_and_not_after_two():
    assert MAX_MISSED_CALLS == 1
    times = [T0 + k * PERIOD for k in range(6)]
    last = times[-1]
    assert _prewarm_deadline(times, last + PERIOD - 1.0) == last + PERIOD  # the next call
    assert _prewarm_deadline(times, last + 2 * PERIOD - 1.0) == last + 2 * PERIOD  # one missed
    assert _prewarm_deadline(times, last + 3 * PERIOD - 1.0) is None  # two missed
    assert _prewarm_deadline(times, last + 5 * PERIOD - 1.0) is None


def test_a_period_resumes_once_its_calls_come_back():
    times = [T0 + k * PERIOD for k in range(6)] + [T0 + 9 * PERIOD]  # three runs skipped, then one came
    last = times[-1]
    assert _prewarm_deadline(times, last + PERIOD - 1.0) == last + PERIOD


def test_a_jittered_period_is_prewarmed_as_early_as_its_calls_have_come():
    # Gaps of 10 s strayed up to 1.5 s from the grid: a call may come 1.5 s early, so the prewarm starts
    # lead (2 s) + 1.5 s before the expected call; an exact period keeps the lead alone.
    jittered = [T0, T0 + 10.0, T0 + 18.5, T0 + 30.0, T0 + 40.5]
    last = jittered[-1]
    expected = last + 10.0
    assert predict(jittered, expected - 3.6, CONFIG) is None
    prediction = predict(jittered, expected - 3.4, CONFIG)
    assert prediction is not None and prediction.reason == "periodic"
    assert abs(prediction.deadline_at - expected) < 0.6  # one median gap after the last call
    exact = [T0 + k * PERIOD for k in range(5)]
    assert _prewarm_deadline(exact, exact[-1] + PERIOD - 2.5) is None
    assert _prewarm_deadline(exact, exact[-1] + PERIOD - 1.5) == exact[-1] + PERIOD


def test_a_gap_off_the_grid_does_not_widen_the_lead():
    # Four gaps on a 10 s grid, one of 15 s (off the grid, periodic all the same at a 0.75 share).
    times = [T0, T0 + 10.0, T0 + 20.0, T0 + 35.0, T0 + 45.0, T0 + 55.0]
    assert _prewarm_deadline(times, times[-1] + PERIOD - 2.5) is None
    assert _prewarm_deadline(times, times[-1] + PERIOD - 1.5) == times[-1] + PERIOD


def test_a_steady_memoryless_stream_is_no_burst_but_a_faster_spell_is():
    import numpy as np

    rng = np.random.default_rng(1)
    # One call every ~8 s on average for ten minutes: within any 60 s window about as fast as before it.
    steady = list(T0 + np.cumsum(rng.exponential(8.0, size=75)))
    for k in range(10, 75, 5):
        prediction = predict(steady[:k], steady[k - 1] + 1.0, CONFIG)
        assert prediction is None or prediction.reason != "burst"
    # The same pace after a quiet hour with one call a quarter: a burst.
    spell = [T0 - 3600.0 + k * 900.0 for k in range(4)] + steady[:10]
    prediction = predict(spell, spell[-1] + 1.0, CONFIG)
    assert prediction is not None and prediction.reason == "burst"
    # With no calls before the window, nothing says what the usual pace is: a burst, as before.
    early = [T0, T0 + 8.0, T0 + 17.0, T0 + 30.0]
    prediction = predict(early, early[-1] + 1.0, CONFIG)
    assert prediction is not None and prediction.reason == "burst"
