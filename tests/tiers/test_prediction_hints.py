"""Which hints the predictor publishes: jitter-robust periods, lead proportional to the period, no hints
for hot adapters, and no republishing of a hint that tells the workers nothing new."""

from __future__ import annotations

import numpy as np
import pytest

from control_plane.db.engine import make_engine, make_sessionmaker
from control_plane.prediction.demand import PredictorConfig, predict
from control_plane.prediction.predictor import Predictor
from tests.tiers.test_prediction import _add_adapter, _add_calls

CONFIG = PredictorConfig(rate_time_constant_s=60.0, lead_s=2.0, resident_rate_per_s=0.5)
T0 = 1_900_000_000.0


class RecordingPublisher:
    def __init__(self) -> None:
        self.hints = []

    def publish(self, hint) -> bool:
        self.hints.append(hint)
        return True


def test_periodic_adapter_with_jittered_and_one_missed_call_is_still_periodic():
    jitter = [0.4, -0.6, 0.2, 0.0, -0.3, 0.5, -0.1]
    times = [T0 + k * 10.0 + j for k, j in zip([0, 1, 2, 4, 5, 6, 7], jitter, strict=True)]  # hour 3 missed
    last = times[-1]
    assert predict(times, last + 5.0, CONFIG) is None  # mid-period
    prediction = predict(times, last + 8.5, CONFIG)
    assert prediction is not None and prediction.reason == "periodic"
    assert abs(prediction.deadline_at - (last + 10.0)) < 1.0


def test_lead_time_grows_with_the_period():
    hourly = [T0 + k * 3600.0 for k in range(5)]
    last = hourly[-1]
    config = PredictorConfig(lead_s=5.0, lead_gap_share=0.2, max_lead_s=600.0)
    assert predict(hourly, last + 3600.0 - 700.0, config) is None
    prediction = predict(hourly, last + 3600.0 - 500.0, config)  # within 600 s (capped 0.2 x 3600)
    assert prediction is not None and prediction.kind == "prewarm"
    assert config.lead_for(10.0) == 5.0 and config.lead_for(100.0) == 20.0


def test_hot_adapter_gets_no_hint_but_a_slow_burst_does():
    rng = np.random.default_rng(0)
    hot = list(T0 + np.cumsum(rng.exponential(0.5, size=200)))  # ~2 calls/s
    assert predict(hot, hot[-1] + 0.3, CONFIG) is None
    # Two calls in the ten minutes before, then a call every ~8 s: a burst, however slow.
    slow = [T0 - 600.0, T0 - 300.0, *(T0 + np.cumsum(rng.exponential(8.0, size=12)))]
    prediction = predict(slow, slow[-1] + 1.0, CONFIG)
    assert prediction is not None and prediction.reason == "burst"


@pytest.fixture(scope="module")
def sessions(database_url):
    engine = make_engine(database_url, pool_size=2)
    yield make_sessionmaker(engine)
    engine.dispose()


def test_sliding_burst_deadline_is_not_republished_every_pass(sessions):
    adapter = _add_adapter(sessions, "bursty")
    gaps_s = [3.1, 1.0, 2.6, 4.0, 1.5, 3.3, 2.2, 5.0, 0.8, 2.9]  # irregular, median ~2.7 s
    calls = [T0 + sum(gaps_s[:i]) for i in range(len(gaps_s) + 1)]
    _add_calls(sessions, adapter, calls)
    publisher = RecordingPublisher()
    predictor = Predictor(sessions, publisher, CONFIG)
    for i in range(20):  # passes every 0.5 s for 10 s: the burst's deadline slides each time
        predictor.run_once(calls[-1] + 0.1 + 0.5 * i)
    mine = [h for h in publisher.hints if h.adapter_id == str(adapter.id)]
    assert all(h.kind == "prewarm" for h in mine)
    assert 1 <= len(mine) <= 4  # once per typical gap, not once per pass


def test_periodic_prewarm_is_published_once_per_call(sessions):
    adapter = _add_adapter(sessions, "periodic")
    calls = [T0 + 1000.0 + k * 10.0 for k in range(5)]
    _add_calls(sessions, adapter, calls)
    publisher = RecordingPublisher()
    predictor = Predictor(sessions, publisher, CONFIG)
    for i in range(8):  # 4 s of passes around the next call, whose usage row has not arrived yet
        predictor.run_once(calls[-1] + 7.5 + 0.5 * i)
    mine = [h for h in publisher.hints if h.adapter_id == str(adapter.id)]
    assert [h.kind for h in mine] == ["prewarm"]
    assert abs(mine[0].deadline_at - (calls[-1] + 10.0)) < 1e-6
