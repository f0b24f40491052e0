"""A periodic prediction stops when its calls stop: after one missed call the next one on the grid is
still prewarmed (a job that skips a run); after two missed in a row no more prewarms are published on
that grid, so a stopped job, or gaps that only looked periodic, do not cost a wasted load every period."""

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
