"""Client request ids reserved for one stream, atomically across workers.

A worker reserves (tenant, request id) before it serves a stream that carries a client-chosen id:

    INSERT INTO request_id_reservation SELECT ... WHERE NOT EXISTS (its usage event)
    ON CONFLICT (tenant_id, request_id) DO UPDATE SET worker_id, reserved_at, expires_at = excluded ...
        WHERE request_id_reservation.expires_at <= now OR request_id_reservation.worker_id = excluded.worker_id
    RETURNING request_id

Exactly one of two workers racing for the same id gets a row back; the other is refused. An id that
already has a usage event (the billing key) is refused too, by the same statement (only a refusal asks
again which of the two it was, for its message). The stream's own usage is never refused: usage is recorded
by `report_usage`, which does not look at reservations. A reservation is that one statement, built once
(the sweep of expired rows a second on every `SWEEP_EVERY`-th): every request of a stream with an id pays
it. A refusal adds two (the clock's step back below, then which refusal it was).

A reservation ends by release (a stream that delivered nothing: a retry under the id must be served) or
by expiry (a worker that died before it could release). A worker re-reserving its own id renews it (a
restarted worker keeps its id). Expired rows are swept a few at a time by later reservations.

Both stamps are the control plane's clock, and so is the expiry's test. A step back leaves a reservation
stamped ahead of it: the next reservation of its id gives it its time to live from then, so it lapses that
long after the step at most, not the step's length later. A step forward lapses reservations early; a
holder that is still serving finds out at its next renewal (a third of the time to live) and ends there.
"""

from __future__ import annotations

import itertools
import uuid
from datetime import datetime, timedelta

from sqlalchemy import (
    DateTime,
    ForeignKey,
    String,
    bindparam,
    delete,
    exists,
    func,
    literal,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.orm import Mapped, Session, mapped_column

from control_plane.db.base import Base, utc_now
from control_plane.errors import AlreadyExists, InvalidArgument
from control_plane.text import check_text
from control_plane.usage.models import UsageEvent
from openlora.text_rules import MAX_KEPT_REQUEST_IDS, MAX_REQUEST_ID_CHARS

DEFAULT_RESERVATION_MS = 120_000
MIN_RESERVATION_MS = 1_000
MAX_RESERVATION_MS = 3_600_000
# Expired rows removed by every SWEEP_EVERY-th reservation of this process (bounded work per call; SKIP
# LOCKED, so never a wait): as many rows per reservation as there are reservations to expire.
SWEEP_EVERY = 16
SWEEP_ROWS = 100 * SWEEP_EVERY
_reservations = itertools.count()


class RequestIdReservation(Base):
    """A client request id held by one worker's stream until `expires_at` or its release."""

    __tablename__ = "request_id_reservation"

    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenant.id"), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    worker_id: Mapped[str] = mapped_column(String(128))
    reserved_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


def _checked_key(tenant_id: str, request_id: str, where: str = "") -> uuid.UUID:
    """The tenant's id of a (tenant id, request id) key; INVALID_ARGUMENT naming `<where>tenant_id` or
    `<where>request_id` (`where`: "keep[3]." for a key of a list)."""
    try:
        tenant = uuid.UUID(tenant_id)
    except ValueError:
        raise InvalidArgument(f"not a valid id: {tenant_id!r}", field=f"{where}tenant_id") from None
    if not request_id:
        raise InvalidArgument("required", field=f"{where}request_id")
    check_text(request_id, f"{where}request_id", MAX_REQUEST_ID_CHARS)
    return tenant


def _billed(session: Session, tenant: uuid.UUID, request_id: str) -> bool:
    found = session.scalar(
        select(UsageEvent.request_id).where(
            UsageEvent.tenant_id == tenant, UsageEvent.request_id == request_id
        )
    )
    return found is not None


def _upsert(tenant, request_id, worker_id, expires_at):
    """INSERT ... SELECT the reservation of (tenant, request id) for the worker until expires_at, stamped
    :now, unless the id was billed; on a conflict it takes the row over when that expired or is this
    worker's own. RETURNING the keys reserved. The four are bound parameters, or the columns of a row
    source the select reads them from."""
    table = RequestIdReservation.__table__
    usage = UsageEvent.__table__
    now = bindparam("now", type_=DateTime(timezone=True))
    billed = exists().where(usage.c.tenant_id == tenant, usage.c.request_id == request_id)
    statement = insert(table).from_select(
        ["tenant_id", "request_id", "worker_id", "reserved_at", "expires_at"],
        # Rows taken in key order, the database's own: two batches at once lock the rows they share alike.
        select(tenant, request_id, worker_id, now, expires_at).where(~billed).order_by(tenant, request_id),
    )
    # An empty worker id never counts as "the same worker" (it would match any other empty one).
    same_worker = (table.c.worker_id == statement.excluded.worker_id) & (statement.excluded.worker_id != "")
    return statement.on_conflict_do_update(
        index_elements=[table.c.tenant_id, table.c.request_id],
        set_={
            "worker_id": statement.excluded.worker_id,
            "reserved_at": statement.excluded.reserved_at,
            "expires_at": statement.excluded.expires_at,
        },
        where=or_(table.c.expires_at <= now, same_worker),
    ).returning(table.c.tenant_id, table.c.request_id)


def _reservation_upsert():
    """The reservation, one statement built once, its values bound parameters."""
    table = RequestIdReservation.__table__
    return _upsert(
        bindparam("tenant_id", type_=table.c.tenant_id.type),
        bindparam("request_id", type_=table.c.request_id.type),
        bindparam("worker_id", type_=table.c.worker_id.type),
        bindparam("expires_at", type_=DateTime(timezone=True)),
    )


_RESERVE = _reservation_upsert()


def reserve_request_id(
    session: Session, tenant_id: str, request_id: str, worker_id: str, ttl_ms: int = 0, sweep: bool = True
) -> AlreadyExists | None:
    """Reserves the id for `worker_id` for `ttl_ms` (0: the default; clamped to 1 s .. 1 h). Returns the
    refusal, AlreadyExists, when the id was billed or another worker's reservation of it has not expired
    (None: reserved); the caller raises it once the transaction is committed, so that a reservation found
    stamped ahead of the clock keeps its time to live from now. `sweep=False`: the caller sweeps (a batch,
    in a transaction of its own: `sweep_for`)."""
    tenant = _checked_key(tenant_id, request_id)
    check_text(worker_id, "worker_id", 128)
    ttl_ms = min(max(ttl_ms or DEFAULT_RESERVATION_MS, MIN_RESERVATION_MS), MAX_RESERVATION_MS)
    now = utc_now()
    if sweep and next(_reservations) % SWEEP_EVERY == 0:
        _sweep(session, now)
    reserved = session.execute(
        _RESERVE,
        {
            "tenant_id": tenant,
            "request_id": request_id,
            "worker_id": worker_id,
            "now": now,
            "expires_at": now + timedelta(milliseconds=ttl_ms),
        },
    ).first()
    if reserved is not None:
        return None
    return _refusal(session, tenant, request_id, now)


def _reservations_upsert():
    """The reservation of a batch's entries, one statement built once: the same upsert over rows given as
    arrays."""
    table = RequestIdReservation.__table__

    def column(name: str, column_type):
        return func.unnest(bindparam(f"{name}s", type_=ARRAY(column_type))).label(name)

    entry = select(
        column("tenant_id", table.c.tenant_id.type),
        column("request_id", table.c.request_id.type),
        column("worker_id", table.c.worker_id.type),
        column("expires_at", DateTime(timezone=True)),
    ).subquery("entry")
    return _upsert(entry.c.tenant_id, entry.c.request_id, entry.c.worker_id, entry.c.expires_at)


_RESERVE_MANY = _reservations_upsert()


def reserve_request_ids(
    session: Session, entries: list[tuple[str, str, str, int]]
) -> list[AlreadyExists | InvalidArgument | None]:
    """`reserve_request_id` for each (tenant id, request id, worker id, ttl ms) in order, in one statement:
    each entry's refusal (its check's InvalidArgument, before any statement; AlreadyExists) or None where
    it was reserved. An entry whose key an earlier one of the batch holds runs after the statement, alone,
    as it would have one by one (one statement cannot update a row twice). The caller sweeps."""
    outcomes: list[AlreadyExists | InvalidArgument | None] = [None] * len(entries)
    first: dict[tuple[uuid.UUID, str], int] = {}
    repeated: list[int] = []
    expiries: dict[int, datetime] = {}
    now = utc_now()
    for i, (tenant_id, request_id, worker_id, ttl_ms) in enumerate(entries):
        try:
            tenant = _checked_key(tenant_id, request_id)
            check_text(worker_id, "worker_id", 128)
        except InvalidArgument as error:
            outcomes[i] = error
            continue
        ttl_ms = min(max(ttl_ms or DEFAULT_RESERVATION_MS, MIN_RESERVATION_MS), MAX_RESERVATION_MS)
        expiries[i] = now + timedelta(milliseconds=ttl_ms)
        if (tenant, request_id) in first:
            repeated.append(i)
        else:
            first[(tenant, request_id)] = i
    if first:
        batch = list(first.items())
        reserved = set(
            session.execute(
                _RESERVE_MANY,
                {
                    "tenant_ids": [tenant for (tenant, _), _ in batch],
                    "request_ids": [request_id for (_, request_id), _ in batch],
                    "worker_ids": [entries[i][2] for _, i in batch],
                    "expires_ats": [expiries[i] for _, i in batch],
                    "now": now,
                },
            ).tuples()
        )
        for (tenant, request_id), i in batch:
            if (tenant, request_id) not in reserved:
                outcomes[i] = _refusal(session, tenant, request_id, now)
    for i in repeated:
        outcomes[i] = reserve_request_id(session, *entries[i], sweep=False)
    return outcomes


def _refusal(session: Session, tenant: uuid.UUID, request_id: str, now: datetime) -> AlreadyExists:
    """Why a reservation of the id was refused (see `reserve_request_id`)."""
    _restamp_ahead_of_clock(session, tenant, request_id, now)
    if _billed(session, tenant, request_id):
        return AlreadyExists(
            f"{request_id!r} was already served and billed; send a new request id", field="request_id"
        )
    return AlreadyExists(f"{request_id!r} is already being served; send a new request id", field="request_id")


def _restamp_ahead_of_clock(session: Session, tenant: uuid.UUID, request_id: str, now: datetime) -> None:
    """A reservation made after now was made before the clock stepped back: how long ago is unknown, at
    most its time to live. It holds that long from now (not for as long as the step; never less, its
    holder may be serving). Only a refusal needs it: such a row has not expired, before or after, so it
    refuses another worker either way, and the holder's own reservation replaces both stamps."""
    table = RequestIdReservation.__table__
    session.execute(
        update(table)
        .where(table.c.tenant_id == tenant, table.c.request_id == request_id, table.c.reserved_at > now)
        .values(
            reserved_at=now,
            expires_at=literal(now, DateTime(timezone=True)) + (table.c.expires_at - table.c.reserved_at),
        )
    )


def release_request_id(session: Session, tenant_id: str, request_id: str, worker_id: str) -> bool:
    """Removes `worker_id`'s reservation of the id; returns whether there was one."""
    tenant = _checked_key(tenant_id, request_id)
    check_text(worker_id, "worker_id", 128)
    table = RequestIdReservation.__table__
    removed = session.execute(
        delete(table)
        .where(table.c.tenant_id == tenant, table.c.request_id == request_id, table.c.worker_id == worker_id)
        .returning(table.c.request_id)
    ).first()
    return removed is not None


def release_worker_request_ids(session: Session, worker_id: str, keep: list[tuple[str, str]]) -> int:
    """Removes every reservation of `worker_id` except those of the (tenant id, request id) keys in
    `keep`, which are reserved again for the default time (their usage is on its way from the worker's
    spool: until it is recorded, only the reservation keeps another worker from serving them); returns
    how many were removed."""
    check_text(worker_id, "worker_id", 128)
    if not worker_id:
        raise InvalidArgument("required", field="worker_id")
    if len(keep) > MAX_KEPT_REQUEST_IDS:
        raise InvalidArgument(f"at most {MAX_KEPT_REQUEST_IDS} keys, got {len(keep)}", field="keep")
    kept = {
        (_checked_key(tenant_id, request_id, f"keep[{i}]."), request_id)
        for i, (tenant_id, request_id) in enumerate(keep)
    }
    table = RequestIdReservation.__table__
    held = session.execute(
        select(table.c.tenant_id, table.c.request_id).where(table.c.worker_id == worker_id).with_for_update()
    ).all()
    released = [(tenant, request_id) for tenant, request_id in held if (tenant, request_id) not in kept]
    for start in range(0, len(released), 1000):
        session.execute(
            delete(table).where(
                table.c.worker_id == worker_id,
                tuple_(table.c.tenant_id, table.c.request_id).in_(released[start : start + 1000]),
            )
        )
    # Reserved again (also where the row lapsed while the worker restarted); one recorded already, or
    # taken by another worker after it lapsed, has nothing to keep.
    for tenant, request_id in kept:
        reserve_request_id(session, str(tenant), request_id, worker_id)
    return len(released)


def sweep_for(session: Session, num_reservations: int) -> None:
    """The sweeps `num_reservations` reservations would have made one by one, as one (for a batch: its
    own transaction, so that the rows it deletes are not held locked while the batch's upserts run)."""
    due = sum(next(_reservations) % SWEEP_EVERY == 0 for _ in range(num_reservations))
    if due:
        _sweep(session, utc_now(), SWEEP_ROWS * due)


def _sweep(session: Session, now: datetime, rows: int = SWEEP_ROWS) -> None:
    table = RequestIdReservation.__table__
    expired = (
        select(table.c.tenant_id, table.c.request_id)
        .where(table.c.expires_at <= now)
        .limit(rows)
        .with_for_update(skip_locked=True)
    )
    session.execute(delete(table).where(tuple_(table.c.tenant_id, table.c.request_id).in_(expired)))
