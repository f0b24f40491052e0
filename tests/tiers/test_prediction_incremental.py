"""The predictor's incremental history against a full rescan of the usage table, on real Postgres rows.

Each pass of `Predictor` reads only the usage recorded since its watermark; a full rescan (the predictor's
former query, kept here as the reference) reads the whole horizon every pass. The same history, arriving
over many passes with late reports, replaced checkpoints, a deleted and a replaced adapter, must give the
same hints; a row committed after a pass by a transaction that stamped it before must not be missed. A
request's time is its arrival (finished_at less total_ms), which is what a prewarm must be ready for."""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from sqlalchemy import select, text, update

from control_plane.db.base import utc_now
from control_plane.db.engine import make_engine, make_sessionmaker
from control_plane.prediction.demand import PredictorConfig
from control_plane.prediction.history import UsageHistory
from control_plane.prediction.predictor import Predictor, _Target
from control_plane.registry.models import STATUS_DELETED, STATUS_READY, VISIBILITY_PUBLIC, Adapter
from control_plane.usage.models import UsageEvent, UsageEventAdapter
from control_plane.usage.service import CHECKPOINT_FINISH_REASON, UsageReport, report_usage
from openlora.cache_scope import cache_scope
from tests.tiers.test_prediction import _add_adapter, _clear

CONFIG = PredictorConfig(
    rate_time_constant_s=60.0, lead_s=2.0, resident_rate_per_s=0.5, history_s=400.0, demote_below_per_s=1e-3
)
T0 = 1_900_000_000.0


class RecordingPublisher:
    def __init__(self) -> None:
        self.hints = []

    def publish(self, hint) -> bool:
        self.hints.append(hint)
        return True


class FullRescanPredictor(Predictor):
    """The reference: every pass reads every event of the horizon (the predictor's former query)."""

    def request_times(self, now: float) -> dict[_Target, list[float]]:
        since = datetime.fromtimestamp(now - self.config.history_s, UTC)
        until = datetime.fromtimestamp(now, UTC)
        query = (
            select(
                Adapter.id,
                Adapter.sha256,
                Adapter.tenant_id,
                Adapter.visibility,
                UsageEvent.finished_at,
                UsageEvent.total_ms,
            )
            .join(UsageEventAdapter, UsageEventAdapter.adapter_id == Adapter.id)
            .join(
                UsageEvent,
                (UsageEvent.tenant_id == UsageEventAdapter.tenant_id)
                & (UsageEvent.request_id == UsageEventAdapter.request_id),
            )
            .where(
                Adapter.status == STATUS_READY,
                UsageEvent.finished_at >= since,
                UsageEvent.finished_at <= until,
            )
        )
        times: dict[_Target, list[float]] = defaultdict(list)
        with self._sessions() as session:
            for adapter_id, sha256, tenant_id, visibility, finished_at, total_ms in session.execute(query):
                arrived_s = finished_at.timestamp() - total_ms / 1000.0  # a request's time is its arrival
                scope = cache_scope(tenant_id, visibility != VISIBILITY_PUBLIC)
                if since.timestamp() <= arrived_s:
                    times[_Target(str(adapter_id), sha256, scope)].append(arrived_s)
        return dict(sorted(times.items(), key=lambda item: item[0].adapter_id))


@pytest.fixture(scope="module")
def sessions(database_url):
    engine = make_engine(database_url, pool_size=4)
    yield make_sessionmaker(engine)
    engine.dispose()


def _report(
    sessions,
    adapter: Adapter,
    finished_s: float,
    request_id: str | None = None,
    total_s: float = 0.0,
    **fields,
) -> str:
    """Records one request on `adapter` (finished at `finished_s` after `total_s` of streaming) as a
    worker's usage report does; returns its request id."""
    request_id = request_id or f"r-{uuid.uuid4().hex}"
    report = UsageReport(
        request_id=request_id,
        tenant_id=str(adapter.tenant_id),
        adapters=((str(adapter.id), 1.0),),
        worker_id="w",
        base_model="tiny",
        prompt_tokens=fields.get("prompt_tokens", 4),
        completion_tokens=fields.get("completion_tokens", 8),
        total_ms=total_s * 1000.0,
        finished_at=datetime.fromtimestamp(finished_s, UTC),
        finish_reason=fields.get("finish_reason", "stop"),
    )
    with sessions.begin() as s:
        report_usage(s, [report], now=report.finished_at)  # the synthetic history's clock, not today's
    return request_id


def _signature(hints) -> list[tuple]:
    return sorted((h.kind, h.adapter_id, h.sha256, h.deadline_at) for h in hints)


def _history_of(predictor: Predictor, now: float) -> dict[str, list[float]]:
    return {t.adapter_id: sorted(times) for t, times in predictor.request_times(now).items()}


def test_incremental_passes_give_the_full_rescans_hints(sessions):
    _clear(sessions)
    rng = np.random.default_rng(7)
    periodic = _add_adapter(sessions, "periodic")
    bursty = _add_adapter(sessions, "bursty")
    hot = _add_adapter(sessions, "hot")
    fading = _add_adapter(sessions, "fading")
    deleted = _add_adapter(sessions, "deleted")
    replaced = _add_adapter(sessions, "replaced")
    calls: list[tuple[float, Adapter]] = []
    calls += [(T0 + k * 20.0 + rng.uniform(-1, 1), periodic) for k in range(30)]
    calls += [(T0 + 100 + t, bursty) for t in np.cumsum(rng.exponential(3.0, size=40))]
    calls += [(T0 + t, hot) for t in np.cumsum(rng.exponential(0.8, size=500))]
    calls += [(T0 + t, fading) for t in np.cumsum(rng.exponential(10.0, size=8))]
    calls += [(T0 + k * 15.0, deleted) for k in range(20)]
    calls += [(T0 + k * 25.0 + 3.0, replaced) for k in range(20)]
    # (finished at, adapter, seconds it streamed): the usage row arrives once the request finished.
    calls = sorted(
        ((t + d, a, d) for (t, a), d in zip(calls, rng.uniform(0.0, 3.0, len(calls)), strict=True)),
        key=lambda c: c[0],
    )
    incremental = Predictor(sessions, RecordingPublisher(), CONFIG)
    reference = FullRescanPredictor(sessions, RecordingPublisher(), CONFIG)
    next_call = 0
    checkpoints: list[tuple[str, Adapter, float]] = []
    for pass_index, now in enumerate(T0 + 5.0 + 5.0 * np.arange(120)):
        while next_call < len(calls) and calls[next_call][0] <= now:
            finished_s, adapter, total_s = calls[next_call]
            next_call += 1
            if next_call % 9 == 0:  # a stream's checkpoint now, its final record a few passes later
                request_id = _report(
                    sessions, adapter, finished_s, None, total_s, completion_tokens=2,
                    finish_reason=CHECKPOINT_FINISH_REASON,
                )  # fmt: skip
                checkpoints.append((request_id, adapter, finished_s + 4.0, total_s + 4.0))
            elif next_call % 13 == 0:  # reported late, after passes that were already past it
                checkpoints.append((None, adapter, finished_s, total_s))
            else:
                _report(sessions, adapter, finished_s, None, total_s)
        for checkpoint in [c for c in checkpoints if c[2] <= now - 6.0]:
            request_id, adapter, finished_s, total_s = checkpoint
            _report(sessions, adapter, finished_s, request_id, total_s)
            checkpoints.remove(checkpoint)
        if pass_index == 60:
            with sessions.begin() as s:
                s.execute(update(Adapter).where(Adapter.id == deleted.id).values(status=STATUS_DELETED))
                s.execute(update(Adapter).where(Adapter.id == replaced.id).values(sha256="e" * 64))
        assert _history_of(incremental, now) == _history_of(reference, now), pass_index
        assert _signature(incremental.run_once(now)) == _signature(reference.run_once(now)), pass_index
    published = incremental._publisher.hints
    kinds = {(h.kind, h.adapter_id) for h in published}
    assert ("prewarm", str(periodic.id)) in kinds and ("prewarm", str(bursty.id)) in kinds
    assert ("demote", str(fading.id)) in kinds
    assert any(h.sha256 == "e" * 64 for h in published)  # the replaced content is what gets prewarmed
    assert not any(h.adapter_id == str(deleted.id) and h.issued_at > T0 + 5.0 + 5.0 * 60 for h in published)

    restarted = Predictor(sessions, RecordingPublisher(), CONFIG)  # rebuilds from the horizon once
    now = T0 + 5.0 + 5.0 * 120
    assert _history_of(restarted, now) == _history_of(reference, now)


def test_a_pass_reads_only_the_usage_recorded_since_the_last_one(sessions):
    _clear(sessions)
    adapter = _add_adapter(sessions, "steady")
    for k in range(50):
        _report(sessions, adapter, T0 + k)
    predictor = Predictor(sessions, RecordingPublisher(), CONFIG)
    predictor.history = UsageHistory(CONFIG.history_s, slack_s=0.0)
    predictor.run_once(T0 + 50)
    assert predictor.history.rows_read == 50  # the first pass reads the horizon
    for k in range(50, 53):
        _report(sessions, adapter, T0 + k)
    predictor.run_once(T0 + 53)
    assert predictor.history.rows_read == 3
    assert predictor.history.num_events == 53
    predictor.run_once(T0 + 54)
    assert predictor.history.rows_read == 0
    # Events that left the horizon are dropped from memory.
    predictor.run_once(T0 + CONFIG.history_s + 10.5)
    assert predictor.history.num_events == 53 - 11


def test_usage_committed_after_a_pass_by_a_transaction_that_stamped_it_before_is_not_missed(sessions):
    _clear(sessions)
    adapter = _add_adapter(sessions, "late")
    for k in range(5):
        _report(sessions, adapter, T0 + k * 10.0)
    # No slack: the watermark alone must hold back for the open transaction.
    predictor = Predictor(sessions, RecordingPublisher(), CONFIG)
    predictor.history = UsageHistory(CONFIG.history_s, slack_s=0.0)
    predictor.run_once(T0 + 45.0)
    writer = sessions()
    try:
        writer.execute(text("SELECT 1"))  # the writer's transaction is open from here
        late_ids = []
        for k in range(5, 8):
            request_id = f"late-{uuid.uuid4().hex}"
            writer.add(
                UsageEvent(
                    request_id=request_id,
                    tenant_id=adapter.tenant_id,
                    prompt_tokens=1,
                    completion_tokens=1,
                    finished_at=datetime.fromtimestamp(T0 + k * 10.0, UTC),
                    recorded_at=utc_now(),
                )
            )
            writer.flush()
            writer.add(
                UsageEventAdapter(
                    tenant_id=adapter.tenant_id, request_id=request_id, adapter_id=adapter.id, weight=1
                )
            )
            late_ids.append(request_id)
        writer.flush()
        time.sleep(0.05)  # the pass below starts strictly after the rows were stamped
        with sessions() as s:
            pass_started = s.execute(text("SELECT clock_timestamp()")).scalar_one()
        predictor.run_once(T0 + 75.0)  # the rows are not visible yet
        assert len(predictor.history.times_by_adapter(T0 + 75.0)[str(adapter.id)]) == 5
        writer.commit()
    finally:
        writer.close()
    with sessions() as s:
        stamped = s.execute(
            select(UsageEvent.recorded_at).where(UsageEvent.request_id.in_(late_ids))
        ).scalars()
        assert all(at < pass_started for at in stamped)  # a plain "since the last pass" read would skip them
    predictor.run_once(T0 + 76.0)
    times = predictor.history.times_by_adapter(T0 + 76.0)[str(adapter.id)]
    assert times == [T0 + k * 10.0 for k in range(8)]


def test_a_periodic_prewarm_names_the_next_arrival_not_the_next_finish(sessions):
    _clear(sessions)
    adapter = _add_adapter(sessions, "long-streams")
    arrivals = [T0 + k * 30.0 for k in range(6)]
    for k, arrived_s in enumerate(arrivals):
        _report(sessions, adapter, arrived_s + 5.0 + k % 2, total_s=5.0 + k % 2)  # streams of 5-6 s
    predictor = Predictor(sessions, RecordingPublisher(), CONFIG)
    assert predictor.run_once(arrivals[-1] + 20.0) == []  # the lead (6 s here) has not begun
    sent = predictor.run_once(arrivals[-1] + 26.0)
    assert [h.kind for h in sent] == ["prewarm"]
    assert sent[0].deadline_at == pytest.approx(arrivals[-1] + 30.0)


def test_usage_recorded_while_the_control_planes_clock_runs_behind_the_databases_is_not_missed(
    sessions, monkeypatch
):
    # The control plane's clock steps back an hour (an NTP correction, a VM resumed) while the database's
    # does not; the pass's watermark comes from the database's clock.
    _clear(sessions)
    adapter = _add_adapter(sessions, "behind")
    for k in range(5):
        _report(sessions, adapter, T0 + k * 10.0)
    predictor = Predictor(sessions, RecordingPublisher(), CONFIG)
    predictor.run_once(T0 + 45.0)
    monkeypatch.setattr("control_plane.usage.service.utc_now", lambda: utc_now() - timedelta(hours=1))
    for k in range(5, 8):
        _report(sessions, adapter, T0 + k * 10.0)
    predictor.run_once(T0 + 76.0)
    times = predictor.history.times_by_adapter(T0 + 76.0)[str(adapter.id)]
    assert times == [T0 + k * 10.0 for k in range(8)]


def test_usage_is_stamped_with_the_databases_clock_when_inserted_and_when_replaced(sessions):
    """The watermark of each pass is the database's clock, so `recorded_at` must be too: a new event and
    one its final replaces are stamped by the database, not with the record's own times (here in the
    synthetic history's 2030)."""
    _clear(sessions)
    adapter = _add_adapter(sessions, "stamped")

    def database_clock() -> datetime:
        with sessions() as s:
            return s.execute(text("SELECT clock_timestamp()")).scalar_one()

    def stored(request_id: str):
        with sessions() as s:
            return s.execute(
                select(UsageEvent.recorded_at, UsageEvent.completion_tokens).where(
                    UsageEvent.request_id == request_id
                )
            ).one()

    before = database_clock()
    request_id = _report(sessions, adapter, T0, finish_reason=CHECKPOINT_FINISH_REASON, completion_tokens=2)
    checkpoint = stored(request_id)
    _report(sessions, adapter, T0 + 5.0, request_id=request_id, completion_tokens=8)  # the final replaces it
    final = stored(request_id)
    after = database_clock()
    assert (checkpoint.completion_tokens, final.completion_tokens) == (2, 8)
    assert before <= checkpoint.recorded_at < final.recorded_at <= after  # restamped when replaced
