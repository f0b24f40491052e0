"""Predictor: reads usage history from Postgres, publishes prewarm/demote hints to `openlora:hints`.

`Predictor.run_once(now)` is one pass (tests drive it with a compressed clock); `run_predictor_loop` runs
passes every `interval_s` until stopped. A pass reads only the usage recorded since the last one and
folds it into the per-adapter history it keeps (`history.UsageHistory`); the first pass reads the horizon
once. Hints are advisory: a pass whose hints cannot reach Redis logs and the next pass publishes again,
so hints resume when Redis returns.

A hint is published once, and again only when it says something new: another kind, a periodic deadline
that moved by more than `REPUBLISH_GAP_SHARE` of the period, or a new deadline after the last one passed
(a burst still going). A burst's deadline slides with every pass; republishing it each time flooded the
stream with hints that changed nothing on the workers.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from control_plane.hints.publisher import HintPublisher
from control_plane.prediction.demand import Prediction, PredictorConfig, predict
from control_plane.prediction.history import UsageHistory
from control_plane.registry.models import STATUS_READY, Adapter
from openlora.hints import Hint

log = logging.getLogger(__name__)

REPUBLISH_GAP_SHARE = 0.25


@dataclass(frozen=True, order=True)
class _Target:
    adapter_id: str
    sha256: str
    cache_scope: str  # '' for public content (openlora/cache_scope.py)


class Predictor:
    def __init__(
        self, sessions: sessionmaker[Session], publisher: HintPublisher, config: PredictorConfig | None = None
    ) -> None:
        self._sessions = sessions
        self._publisher = publisher
        self.config = config or PredictorConfig()
        self.history = UsageHistory(self.config.history_s)
        # adapter id -> (kind, deadline) of the last hint that reached the stream: not repeated.
        self._published: dict[str, tuple[str, float | None]] = {}

    def _is_news(self, adapter_id: str, prediction: Prediction, now: float) -> bool:
        """Whether `prediction` tells the workers more than the last hint published for `adapter_id`."""
        last = self._published.get(adapter_id)
        if last is None or last[0] != prediction.kind:
            return True
        last_deadline, deadline = last[1], prediction.deadline_at
        if last_deadline is None or deadline is None:
            return last_deadline != deadline
        if last_deadline < now < deadline:
            return True  # the last one passed
        if prediction.reason == "periodic" and prediction.gap_s is not None:
            return abs(deadline - last_deadline) > REPUBLISH_GAP_SHARE * prediction.gap_s
        return False

    def request_times(self, now: float) -> dict[_Target, list[float]]:
        """Unix seconds of each ready adapter's requests within the history window before `now`: the
        usage recorded since the last pass is folded into the kept history, then the ready adapters
        among those with calls in the window are looked up."""
        with self._sessions() as session:
            self.history.refresh(session, now)
            times = self.history.times_by_adapter(now)
            if not times:
                return {}
            ready = session.execute(
                select(Adapter).where(
                    Adapter.status == STATUS_READY, Adapter.id.in_([uuid.UUID(a) for a in times])
                )
            ).scalars()
            targets = sorted(_Target(str(a.id), a.sha256, a.cache_scope) for a in ready)
        return {target: times[target.adapter_id] for target in targets}

    def predict(self, now: float) -> list[Hint]:
        """The hints the usage history calls for at `now` (Unix seconds), repeats left out."""
        hints = []
        for target, times in self.request_times(now).items():
            prediction = predict(times, now, self.config)
            if prediction is None:
                self._published.pop(target.adapter_id, None)
                continue
            if not self._is_news(target.adapter_id, prediction, now):
                continue
            tier = "host" if prediction.kind == "prewarm" else "gpu"
            hints.append(
                Hint(
                    kind=prediction.kind,  # type: ignore[arg-type]
                    adapter_id=target.adapter_id,
                    sha256=target.sha256,
                    cache_scope=target.cache_scope,
                    tier=tier,
                    deadline_at=prediction.deadline_at,
                    issued_at=now,
                    reason=prediction.reason if prediction.kind == "prewarm" else "",
                )
            )
        return hints

    def run_once(self, now: float | None = None) -> list[Hint]:
        """One pass: returns the hints that reached the stream."""
        now = time.time() if now is None else now
        sent = []
        for hint in self.predict(now):
            if self._publisher.publish(hint):
                self._published[hint.adapter_id] = (hint.kind, hint.deadline_at)
                sent.append(hint)
        return sent


def run_predictor_loop(
    session_factory: sessionmaker[Session],
    redis_url: str | None,
    interval_s: float,
    stop: threading.Event,
    config: PredictorConfig | None = None,
    clock=time.time,
) -> None:
    """Runs prediction passes every `interval_s` until `stop` is set (run it on its own thread). A failing
    pass (database or Redis down) is logged and the loop goes on."""
    publisher = HintPublisher(redis_url)
    predictor = Predictor(session_factory, publisher, config)
    try:
        while not stop.is_set():
            try:
                predictor.run_once(clock())
            except Exception:  # advisory: never let a bad pass end the loop
                log.exception("prediction pass failed; retrying in %.1fs", interval_s)
            stop.wait(interval_s)
    finally:
        publisher.close()
