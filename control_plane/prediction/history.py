"""Each adapter's request times within the predictor's history horizon, kept up to date from usage rows.

A request's time is when it arrived: its usage event's `finished_at` less its `total_ms`. A prediction
names when the next request will arrive, and a request that streams for a while finishes well after the
moment its adapter had to be ready.

The first pass (and any pass whose horizon reaches below what was kept) reads every usage event whose
`finished_at` lies in the horizon; every later pass reads only the events recorded since a watermark on
`recorded_at`, and folds them in. The fold is keyed by (tenant, request id), so an event read twice changes
nothing and an event replaced by a later record of the same request (a stream's checkpoint, then its
final count) moves to its new time.

The watermark must not skip a row committed late with an older `recorded_at`: a writer stamps its rows
inside its transaction and they become visible only at its commit, possibly after a pass ran. So the
next pass reads from the start of the oldest transaction open in the database when this pass began (its
rows are stamped with that start: `recorded_at` is the database's `now()`), or this pass's start when none
is open, less `RECORDED_AT_SLACK_S`. Both sides are the database's clock: the control plane's may run apart
from it or step (a row it stamped an hour behind the watermark was never read). Rows inside that overlap
are read again and recognised by their key.
"""

from __future__ import annotations

import bisect
import heapq
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from control_plane.usage.models import UsageEvent, UsageEventAdapter

RECORDED_AT_SLACK_S = 30.0

# Now (the database's clock) and the start of the oldest other open transaction in this database.
_OLDEST_OPEN_TRANSACTION = text(
    "SELECT clock_timestamp(), ("
    " SELECT min(xact_start) FROM pg_stat_activity"
    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
    " AND backend_type = 'client backend' AND xact_start IS NOT NULL)"
)

_EventKey = tuple[uuid.UUID, str]


def arrival_s(finished_at: datetime, total_ms: float) -> float:
    """Unix seconds a request arrived, from its usage event."""
    return finished_at.timestamp() - max(total_ms, 0.0) / 1000.0


class UsageHistory:
    """Per adapter id (str), the sorted arrival times (Unix seconds) of its requests."""

    def __init__(self, history_s: float, slack_s: float = RECORDED_AT_SLACK_S) -> None:
        self.history_s = history_s
        self.slack_s = slack_s
        self._events: dict[_EventKey, tuple[float, tuple[str, ...]]] = {}
        self._times: dict[str, list[float]] = {}
        self._expiry: list[tuple[float, _EventKey]] = []  # min-heap; stale entries skipped when popped
        self._read_from: datetime | None = None  # recorded_at bound of the next read; None: rebuild
        self._kept_from = float("-inf")  # requests that arrived before this were dropped or never read
        self.rows_read = 0  # usage rows the last refresh read (one per event and adapter)

    def refresh(self, session: Session, now: float) -> None:
        """Brings the times up to date for a pass at `now` (Unix seconds)."""
        since = datetime.fromtimestamp(now - self.history_s, UTC)
        if self._read_from is None or since.timestamp() < self._kept_from:
            self._reset()
        db_now, oldest_open = session.execute(_OLDEST_OPEN_TRANSACTION).one()
        query = (
            select(
                UsageEvent.tenant_id,
                UsageEvent.request_id,
                UsageEvent.finished_at,
                UsageEvent.total_ms,
                UsageEventAdapter.adapter_id,
            )
            .join(
                UsageEventAdapter,
                (UsageEventAdapter.tenant_id == UsageEvent.tenant_id)
                & (UsageEventAdapter.request_id == UsageEvent.request_id),
            )
            .where(UsageEvent.finished_at >= since)
        )
        if self._read_from is not None:
            query = query.where(UsageEvent.recorded_at >= self._read_from)
        read: dict[_EventKey, tuple[float, list[str]]] = {}
        self.rows_read = 0
        for tenant_id, request_id, finished_at, total_ms, adapter_id in session.execute(query):
            self.rows_read += 1
            arrived_s = arrival_s(finished_at, total_ms)
            read.setdefault((tenant_id, request_id), (arrived_s, []))[1].append(str(adapter_id))
        for key, (arrived_s, adapter_ids) in read.items():
            self._fold(key, arrived_s, tuple(sorted(adapter_ids)))
        self._kept_from = max(self._kept_from, since.timestamp())
        self._drop_before(self._kept_from)
        self._read_from = min(db_now, oldest_open or db_now) - timedelta(seconds=self.slack_s)

    def times_by_adapter(self, now: float) -> dict[str, list[float]]:
        """Each adapter's times in [now - history_s, now] (as a full read of that window would give)."""
        low = datetime.fromtimestamp(now - self.history_s, UTC).timestamp()
        high = datetime.fromtimestamp(now, UTC).timestamp()
        out = {}
        for adapter_id, times in self._times.items():
            window = times[bisect.bisect_left(times, low) : bisect.bisect_right(times, high)]
            if window:
                out[adapter_id] = window
        return out

    @property
    def num_events(self) -> int:
        return len(self._events)

    def _reset(self) -> None:
        self._events.clear()
        self._times.clear()
        self._expiry.clear()
        self._read_from = None
        self._kept_from = float("-inf")

    def _fold(self, key: _EventKey, at_s: float, adapter_ids: tuple[str, ...]) -> None:
        known = self._events.get(key)
        if known == (at_s, adapter_ids):
            return  # read again inside the overlap
        if known is not None:  # replaced by a later record of the same request
            self._remove(known)
        self._events[key] = (at_s, adapter_ids)
        for adapter_id in adapter_ids:
            bisect.insort(self._times.setdefault(adapter_id, []), at_s)
        heapq.heappush(self._expiry, (at_s, key))

    def _remove(self, event: tuple[float, tuple[str, ...]]) -> None:
        at_s, adapter_ids = event
        for adapter_id in adapter_ids:
            times = self._times[adapter_id]
            del times[bisect.bisect_left(times, at_s)]
            if not times:
                del self._times[adapter_id]

    def _drop_before(self, kept_from: float) -> None:
        touched: dict[str, None] = {}
        while self._expiry and self._expiry[0][0] < kept_from:
            at_s, key = heapq.heappop(self._expiry)
            event = self._events.get(key)
            if event is not None and event[0] == at_s:
                del self._events[key]
                for adapter_id in event[1]:
                    touched[adapter_id] = None
        for adapter_id in touched:
            times = self._times.get(adapter_id)
            if times is not None:
                del times[: bisect.bisect_left(times, kept_from)]
                if not times:
                    del self._times[adapter_id]
