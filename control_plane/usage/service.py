"""Recording usage events idempotently, and reading usage back.

One event per (tenant, request id): request ids are chosen by clients, so another tenant sending the same
id is another request. A worker spools a running stream's delivered count as a checkpoint (finish
reason "interrupted") and its final count when the stream ends; after a crash only the checkpoints
remain. Records of one key merge by `outranks`: the larger completion count, then the larger prompt count,
then a final over a checkpoint; never a sum. The stored event is the highest-ranked record received so
far, whatever the order, so retries and duplicates never double count.

Only one worker serves a stream, so records of one key from two workers are two servings of the id, and
each delivered its own tokens: a retry served by another worker while the first was paused or dead past
the id's reservation (the first one's record arrives when it runs again, or from its spool once it
restarts), or while the control plane could not reserve the id. The record of a worker other than the
stored event's is billed as a request of its own, under `another_serving_id` (merged by rank there with
that worker's other records of it); a record without a worker id merges as before.

An event is inserted with `INSERT ... ON CONFLICT (tenant_id, request_id) DO NOTHING RETURNING ...`; a
record whose key was already stored is compared with the stored row (locked `FOR UPDATE`) and, when it
outranks it, replaces it. The hourly counters move in the same transaction by exactly the difference: a
new event adds its contribution, a replaced one takes its old contribution out (from its own hour) and
adds the new one. A mixed request's tokens are split across its adapters in adapter-id order, so a
contribution taken out is exactly the one that was added.

A batch is validated whole first and then succeeds or fails atomically. Rows are written in a fixed order
(request id, counter key) so that concurrent batches cannot deadlock."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from sqlalchemy import delete, func, select, tuple_
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from control_plane.db.base import utc_now
from control_plane.errors import AlreadyExists, InvalidArgument
from control_plane.registry.models import Adapter
from control_plane.tenancy.models import Tenant
from control_plane.text import check_text
from control_plane.usage.models import UsageCounter, UsageEvent, UsageEventAdapter
from control_plane.usage.shares import MICROS, ensemble_base_share, split_micro_tokens, whole_tokens
from openlora.mix_rules import MAX_MIX_WEIGHT, REQUEST_KINDS
from openlora.names import ADAPTER_NAME
from openlora.text_rules import MAX_REQUEST_ID_CHARS
from openlora.usage_shares import wire_share

log = logging.getLogger(__name__)

# The finish reason of a checkpoint: the count a stream had delivered when its worker last spooled it.
# Stored as such only when the stream never finished (its worker was killed).
CHECKPOINT_FINISH_REASON = "interrupted"
# Request kinds billed per adapter: one adapter or none, and records of workers that do not say.
SINGLE_KINDS = frozenset({"", "single"})


def royalty_on_every_token(request_kind: str) -> bool:
    """Whether each adapter of a request of this kind earns its royalty on all its completion tokens: a
    linear mix or a merge applies every member to every token, whatever weights the caller picked (a
    weight split let a royalty adapter at weight 1 beside a zero-valued one at 1000 earn 1/1000). An
    ensemble's weights do shape its output (each member samples its own distribution), so its members
    earn on their weighted share."""
    return request_kind == "linear_mix" or request_kind.startswith("merge:")


@dataclass(frozen=True)
class UsageReport:
    """One finished request as a worker reports it; `adapters` holds (adapter id, mix weight) pairs."""

    request_id: str
    tenant_id: str
    adapters: tuple[tuple[str, float], ...]
    worker_id: str
    base_model: str
    prompt_tokens: int
    completion_tokens: int
    queue_ms: float = 0.0
    ttft_ms: float = 0.0
    total_ms: float = 0.0
    finished_at: datetime | None = None
    finish_reason: str = ""
    # "single" | "linear_mix" | "merge:<method>" | "ensemble"; "" from a worker that does not say.
    request_kind: str = ""
    mix_name: str = ""  # the saved mix the request named, else ""


@dataclass(frozen=True)
class ReportOutcome:
    inserted: int  # events newly recorded
    duplicates: int  # records that changed nothing (a stored event ranks as high)
    superseded: int = 0  # stored events replaced by a record that outranks them


def _uuid(value: str, field: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidArgument(f"not a valid id: {value!r}", field=field) from None


def _hour(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def _hour_at_or_after(moment: datetime) -> datetime:
    """The first whole UTC hour at or after `moment`; the last instant datetime holds for one within the
    last hour of 9999 (every event's hour lies before it)."""
    hour = _hour(moment)
    if hour == moment:
        return hour
    try:
        return hour + timedelta(hours=1)
    except OverflowError:
        return datetime.max.replace(tzinfo=UTC)


@dataclass(frozen=True)
class _Checked:
    report: UsageReport
    tenant_id: uuid.UUID
    adapters: tuple[tuple[uuid.UUID, Decimal], ...]  # in adapter-id order
    finished_at: datetime
    mix: str = ""  # the mix's identity on the invoice (mix_identity); "" for a single request

    @property
    def rank(self) -> tuple[int, int, bool]:
        r = self.report
        return r.completion_tokens, r.prompt_tokens, r.finish_reason != CHECKPOINT_FINISH_REASON


def _check(session: Session, reports: list[UsageReport], now: datetime) -> list[_Checked]:
    checked = []
    for i, r in enumerate(reports):
        where = f"events[{i}]"
        if not r.request_id or len(r.request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidArgument(
                f"must be 1..{MAX_REQUEST_ID_CHARS} characters", field=f"{where}.request_id"
            )
        if r.prompt_tokens < 0 or r.completion_tokens < 0:
            raise InvalidArgument("token counts must not be negative", field=f"{where}.prompt_tokens")
        if not r.base_model:
            raise InvalidArgument("required", field=f"{where}.base_model")
        check_text(r.request_id, f"{where}.request_id", MAX_REQUEST_ID_CHARS)
        check_text(r.base_model, f"{where}.base_model", 128)
        check_text(r.worker_id, f"{where}.worker_id", 128)
        check_text(r.finish_reason, f"{where}.finish_reason", 32)
        if r.request_kind not in REQUEST_KINDS:  # it is printed on invoices: a closed set, as the proto says
            raise InvalidArgument(
                f"must be one of {sorted(REQUEST_KINDS)}, got {r.request_kind[:64]!r}",
                field=f"{where}.request_kind",
            )
        if r.mix_name and not ADAPTER_NAME.fullmatch(r.mix_name):  # a saved mix's name, printed as well
            raise InvalidArgument(f"not a mix name: {r.mix_name[:128]!r}", field=f"{where}.mix_name")
        for name in ("queue_ms", "ttft_ms", "total_ms"):
            value = getattr(r, name)
            if not math.isfinite(value) or value < 0:
                raise InvalidArgument("must be a non-negative finite number", field=f"{where}.{name}")
        adapters = []
        for j, (adapter_id, weight) in enumerate(r.adapters):
            adapter = _uuid(adapter_id, f"{where}.adapters[{j}].adapter_id")
            if math.isfinite(weight) and weight > MAX_MIX_WEIGHT:
                # A worker sends shares in (0, 1] (a mix weight, at most MAX_MIX_WEIGHT, from older
                # ones); a larger one overflowed the share's column or the decimal context (INTERNAL).
                # One that is no finite number bills nothing and is left out below, as before.
                raise InvalidArgument(
                    f"must be at most {MAX_MIX_WEIGHT:g}, got {weight:g}",
                    field=f"{where}.adapters[{j}].weight",
                )
            share = wire_share(weight)
            if share == 0:
                # It bills nothing (rounds to zero, or is no positive number): refusing the record for it
                # left tokens already delivered unbilled; its tokens go to the other shares.
                log.warning("usage %s.adapters[%d]: share %r bills nothing, left out", where, j, weight)
                continue
            adapters.append((adapter, share))
        if len({a for a, _ in adapters}) != len(adapters):
            raise InvalidArgument("an adapter is listed twice", field=f"{where}.adapters")
        checked.append(
            _Checked(
                r,
                _uuid(r.tenant_id, f"{where}.tenant_id"),
                tuple(sorted(adapters, key=lambda a: str(a[0]))),
                min(r.finished_at, now) if r.finished_at is not None else now,
            )
        )
    tenant_ids = {c.tenant_id for c in checked}
    known_tenants = (
        set(session.scalars(select(Tenant.id).where(Tenant.id.in_(tenant_ids)))) if tenant_ids else set()
    )
    adapter_ids = {a for c in checked for a, _ in c.adapters}
    known_adapters = (
        {
            adapter_id: name
            for adapter_id, name in session.execute(
                select(Adapter.id, Adapter.name).where(Adapter.id.in_(adapter_ids))
            )
        }
        if adapter_ids
        else {}
    )
    for i, c in enumerate(checked):
        if c.tenant_id not in known_tenants:
            raise InvalidArgument(f"unknown tenant {c.tenant_id}", field=f"events[{i}].tenant_id")
        for j, (adapter_id, _) in enumerate(c.adapters):
            if adapter_id not in known_adapters:
                raise InvalidArgument(
                    f"unknown adapter {adapter_id}", field=f"events[{i}].adapters[{j}].adapter_id"
                )
    return [
        dataclasses.replace(c, mix=mix_identity(c.report, [known_adapters[a] for a, _ in c.adapters]))
        for c in checked
    ]


def mix_identity(report: UsageReport, adapter_names: list[str]) -> str:
    """How the invoice names a mix or ensemble request: the saved mix's name, else its adapters' names
    sorted and joined by "+"; "" for a single request and for a record that does not say its kind."""
    if report.request_kind in SINGLE_KINDS:
        return ""
    return report.mix_name or "+".join(sorted(adapter_names))


def check_request_id_unused(session: Session, tenant_id: str, request_id: str) -> None:
    """Raises AlreadyExists when this tenant's request id already has a recorded usage event: the
    request id is the billing idempotency key, so serving it again would never be billed."""
    tenant = _uuid(tenant_id, "tenant_id")
    if not request_id:
        raise InvalidArgument("required", field="request_id")
    check_text(request_id, "request_id", MAX_REQUEST_ID_CHARS)
    used = session.scalar(
        select(UsageEvent.request_id).where(
            UsageEvent.tenant_id == tenant, UsageEvent.request_id == request_id
        )
    )
    if used is not None:
        raise AlreadyExists(
            f"{request_id!r} was already served and billed; send a new request id", field="request_id"
        )


def report_usage(session: Session, reports: list[UsageReport], now: datetime | None = None) -> ReportOutcome:
    """Records a batch of usage reports: each key's best record is inserted, or replaces the stored
    event it outranks, or changes nothing (a duplicate); a record of a key another worker's event holds
    is another serving, recorded under `another_serving_id`. Counters move by exactly the difference.

    A record counts at the time its worker says it finished, or at `now` (when the batch arrived; the
    control plane's clock by default) when that is earlier: nothing finishes after it is reported, and a
    worker whose clock ran ahead stamped its usage in a later month (in 9999, one no invoice can ask for)."""
    checked = _check(session, reports, now or utc_now())
    by_worker: dict[str, list[_Checked]] = defaultdict(list)
    for c in checked:  # a worker's batch holds its own records only: one group, but for a moved spool
        by_worker[c.report.worker_id].append(c)
    new: list[_Checked] = []
    replaced: list[tuple[_Checked, _Contribution]] = []
    for group in by_worker.values():
        group_new, group_replaced, elsewhere = _record(session, group, divert=True)
        new += group_new
        replaced += group_replaced
        if elsewhere:
            others = [
                dataclasses.replace(
                    c,
                    report=dataclasses.replace(
                        c.report, request_id=another_serving_id(c.report.request_id, c.report.worker_id)
                    ),
                )
                for c in elsewhere
            ]
            others_new, others_replaced, _ = _record(session, others, divert=False)
            new += others_new
            replaced += others_replaced
    deltas: dict[tuple, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for c in new:
        _count(deltas, _contribution_of(c), +1)
    for c, old in replaced:
        _count(deltas, old, -1)
        _count(deltas, _contribution_of(c), +1)
    _move_counters(session, deltas)
    return ReportOutcome(len(new), len(reports) - len(new) - len(replaced), len(replaced))


def another_serving_id(request_id: str, worker_id: str) -> str:
    """The key a second serving of `request_id` (by `worker_id`) is billed under: the id, cut to leave
    room, then "~" and a digest of the id and the worker (at most MAX_REQUEST_ID_CHARS characters; workers
    refuse client ids that end so, `SERVING_KEY_SUFFIX`)."""
    digest = hashlib.sha256(f"{request_id}\0{worker_id}".encode()).hexdigest()[:16]
    return f"{request_id[: MAX_REQUEST_ID_CHARS - len(digest) - 1]}~{digest}"


def _record(
    session: Session, checked: list[_Checked], *, divert: bool
) -> tuple[list[_Checked], list[tuple[_Checked, _Contribution]], list[_Checked]]:
    """Inserts each key's best record, or replaces the stored event it outranks; returns the inserted
    records, the replacing ones with the contribution each replaced, and (when `divert`) the records whose
    key is stored from another worker, left unrecorded."""
    best: dict[tuple[str, str], _Checked] = {}
    for c in checked:
        key = (str(c.tenant_id), c.report.request_id)
        if key not in best or outranks(c.rank, best[key].rank):
            best[key] = c
    if not best:
        return [], [], []
    ordered = [best[k] for k in sorted(best)]
    inserted_keys = {
        (tenant_id, request_id)
        for tenant_id, request_id in session.execute(_INSERT_EVENTS, [_event_row(c) for c in ordered])
    }
    new = [c for c in ordered if (c.tenant_id, c.report.request_id) in inserted_keys]
    stored = [c for c in ordered if (c.tenant_id, c.report.request_id) not in inserted_keys]
    replaced, elsewhere = _replace_outranked(session, stored, divert)
    _link_adapters(session, new + [c for c, _ in replaced])
    return new, replaced, elsewhere


def outranks(rank: tuple[int, int, bool], other: tuple[int, int, bool]) -> bool:
    """Whether a record of rank (completion tokens, prompt tokens, final) replaces one of rank `other`
    under the same key: a stream's counts only grow, and its final record is its largest."""
    return rank > other


@dataclass(frozen=True)
class _Contribution:
    """What one stored event added to the counters."""

    tenant_id: uuid.UUID
    base_model: str
    adapters: tuple[tuple[uuid.UUID, Decimal], ...]  # in adapter-id order
    hour_at: datetime
    prompt_tokens: int
    completion_tokens: int
    request_kind: str
    mix: str


def _contribution_of(c: _Checked) -> _Contribution:
    r = c.report
    return _Contribution(
        c.tenant_id,
        r.base_model,
        c.adapters,
        _hour(c.finished_at),
        r.prompt_tokens,
        r.completion_tokens,
        r.request_kind,
        c.mix,
    )


def _event_row(c: _Checked) -> dict:
    r = c.report
    return {
        "request_id": r.request_id,
        "tenant_id": c.tenant_id,
        "worker_id": r.worker_id,
        "base_model": r.base_model,
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "queue_ms": r.queue_ms,
        "ttft_ms": r.ttft_ms,
        "total_ms": r.total_ms,
        "finish_reason": r.finish_reason[:32],
        "finished_at": c.finished_at,
        "request_kind": r.request_kind,
        "mix": c.mix,
    }


# The statements of a batch are built once, each row a set of parameters (SQLAlchemy sends them as one
# multi-row statement, "insertmanyvalues"): a statement holding the batch's rows as values was compiled
# again for every batch, most of the control plane's CPU per usage record.
def _events_insert():
    """Each record's event unless its key is stored already; RETURNING the keys inserted. `recorded_at` is
    the database's clock, as the predictor's watermark (`UsageHistory`): the control plane's own may run
    apart from it, or step, and a row stamped behind the watermark is never read."""
    table = UsageEvent.__table__
    return (
        insert(table)
        .values(recorded_at=func.now())
        .on_conflict_do_nothing(index_elements=[table.c.tenant_id, table.c.request_id])
        .returning(table.c.tenant_id, table.c.request_id)
    )


def _counters_upsert():
    """Adds a row's deltas to its counter line (made when missing); RETURNING the line's totals."""
    table = UsageCounter.__table__
    statement = insert(table)
    totals = ("requests", "prompt_micro_tokens", "completion_micro_tokens", "royalty_micro_tokens")
    return statement.on_conflict_do_update(
        constraint="uq_usage_counter_line_hour",
        set_={name: table.c[name] + statement.excluded[name] for name in totals},
    ).returning(table.c.id, *(table.c[name] for name in totals))


_INSERT_EVENTS = _events_insert()
_INSERT_LINKS = insert(UsageEventAdapter.__table__)
_MOVE_COUNTERS = _counters_upsert()


def _replace_outranked(
    session: Session, stored: list[_Checked], divert: bool
) -> tuple[list[tuple[_Checked, _Contribution]], list[_Checked]]:
    """Locks the stored events of these keys, replaces each one its record outranks; returns the
    replacing records with the contribution of the event each replaced, and (when `divert`) the records
    of another worker than their stored event's, which replace nothing."""
    if not stored:
        return [], []
    keys = [(c.tenant_id, c.report.request_id) for c in stored]
    rows = {
        (row.tenant_id, row.request_id): row
        for row in session.execute(
            select(UsageEvent)
            .where(tuple_(UsageEvent.tenant_id, UsageEvent.request_id).in_(keys))
            .order_by(UsageEvent.tenant_id, UsageEvent.request_id)
            .with_for_update()
        ).scalars()
    }
    winners, elsewhere = [], []
    for c in stored:
        row = rows[(c.tenant_id, c.report.request_id)]
        if divert and row.worker_id and c.report.worker_id and row.worker_id != c.report.worker_id:
            elsewhere.append(c)
            continue
        old_rank = (row.completion_tokens, row.prompt_tokens, row.finish_reason != CHECKPOINT_FINISH_REASON)
        if outranks(c.rank, old_rank):
            winners.append((c, row))
    if not winners:
        return [], elsewhere
    won_keys = [(c.tenant_id, c.report.request_id) for c, _ in winners]
    old_links: dict[tuple[uuid.UUID, str], list[tuple[uuid.UUID, Decimal]]] = defaultdict(list)
    for tenant_id, request_id, adapter_id, weight in session.execute(
        delete(UsageEventAdapter)
        .where(tuple_(UsageEventAdapter.tenant_id, UsageEventAdapter.request_id).in_(won_keys))
        .returning(
            UsageEventAdapter.tenant_id,
            UsageEventAdapter.request_id,
            UsageEventAdapter.adapter_id,
            UsageEventAdapter.weight,
        )
    ):
        old_links[(tenant_id, request_id)].append((adapter_id, weight))
    replaced = []
    for c, row in winners:
        key = (c.tenant_id, c.report.request_id)
        old = _Contribution(
            row.tenant_id,
            row.base_model,
            tuple(sorted(old_links[key], key=lambda link: str(link[0]))),
            _hour(row.finished_at),
            row.prompt_tokens,
            row.completion_tokens,
            row.request_kind,
            row.mix,
        )
        for name, value in _event_row(c).items():
            setattr(row, name, value)
        row.recorded_at = func.now()  # the database's clock, as `_events_insert` stamps it
        replaced.append((c, old))
    session.flush()
    return replaced, elsewhere


def _link_adapters(session: Session, events: list[_Checked]) -> None:
    links = [
        {
            "tenant_id": c.tenant_id,
            "request_id": c.report.request_id,
            "adapter_id": adapter_id,
            "weight": weight,
        }
        for c in events
        for adapter_id, weight in c.adapters
    ]
    if links:
        session.execute(_INSERT_LINKS, links)


def _count(deltas: dict[tuple, list[int]], c: _Contribution, sign: int) -> None:
    """Adds (sign +1) or takes out (-1) one event's contribution to deltas[(tenant, base model, adapter
    or None, hour, request kind, mix)] = [requests, prompt µtokens, completion µtokens, royalty µtokens]."""
    if not c.adapters:
        delta = deltas[(c.tenant_id, c.base_model, None, c.hour_at, c.request_kind, c.mix)]
        delta[0] += sign
        delta[1] += sign * c.prompt_tokens * MICROS
        delta[2] += sign * c.completion_tokens * MICROS
        return
    weights = [w for _, w in c.adapters]
    # An ensemble's base-model member: its share of the tokens is billed as the base model (no royalty).
    base_share = ensemble_base_share(c.request_kind, weights)
    lines = [adapter_id for adapter_id, _ in c.adapters] + ([None] if base_share else [])
    weights += [base_share] if base_share else []
    prompt_parts = split_micro_tokens(c.prompt_tokens, weights)
    completion_parts = split_micro_tokens(c.completion_tokens, weights)
    every_token = royalty_on_every_token(c.request_kind)
    for adapter_id, prompt, completion in zip(lines, prompt_parts, completion_parts, strict=True):
        delta = deltas[(c.tenant_id, c.base_model, adapter_id, c.hour_at, c.request_kind, c.mix)]
        delta[0] += sign
        delta[1] += sign * prompt
        delta[2] += sign * completion
        if adapter_id is not None:  # the base model earns no royalty
            delta[3] += sign * (c.completion_tokens * MICROS if every_token else completion)


def _move_counters(session: Session, deltas: dict[tuple, list[int]]) -> None:
    """Adds each line's deltas to its counter in one statement (a line's row made when missing), lines in
    one order (two batches at once lock the rows they share in the same order); a line every event left
    (all totals 0) is deleted."""
    rows = []
    for key in sorted(deltas, key=lambda k: (str(k[0]), k[1], str(k[2]), k[3], k[4], k[5])):
        tenant_id, base_model, adapter_id, hour, request_kind, mix = key
        requests, prompt, completion, royalty = deltas[key]
        if requests == prompt == completion == royalty == 0:
            continue  # a replacement that moved nothing on this line
        rows.append(
            {
                "tenant_id": tenant_id,
                "base_model": base_model,
                "adapter_id": adapter_id,
                "hour_at": hour,
                "request_kind": request_kind,
                "mix": mix,
                "requests": requests,
                "prompt_micro_tokens": prompt,
                "completion_micro_tokens": completion,
                "royalty_micro_tokens": royalty,
            }
        )
    if not rows:
        return
    moved = session.execute(_MOVE_COUNTERS, rows).all()
    emptied = [counter_id for counter_id, *totals in moved if not any(totals)]
    if emptied:  # every event of those lines moved to another hour: no empty line left
        session.execute(delete(UsageCounter).where(UsageCounter.id.in_(emptied)))


@dataclass(frozen=True)
class UsageLine:
    adapter: str  # "" for the base model alone
    adapter_tenant: str
    requests: int
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class UsageSummary:
    lines: list[UsageLine]
    total_requests: int
    total_prompt_tokens: int
    total_completion_tokens: int


def get_usage(session: Session, tenant: Tenant, start: datetime | None, end: datetime | None) -> UsageSummary:
    """The tenant's consumption per adapter over the hours in [start, end) (hour granularity: an event
    counts in the hour it finished). Mixed requests count once per adapter in the lines and once in the
    totals; token counts of mixed requests are split by weight, and the lines are rounded to whole tokens
    together (`whole_tokens`), so that their tokens add up to the totals'."""
    if start is not None and end is not None and end < start:
        raise InvalidArgument("must not be before start", field="end")
    counter_window = [UsageCounter.tenant_id == tenant.id]
    event_window = [UsageEvent.tenant_id == tenant.id]
    # An event's UTC hour lies in the window iff the event finished at or after the window's bound rounded
    # up to a whole UTC hour (date_trunc truncated in the session's time zone: under a zone of a
    # fractional offset, such as Asia/Kolkata, the totals and the lines counted different events).
    if start is not None:
        counter_window.append(UsageCounter.hour_at >= start)
        event_window.append(UsageEvent.finished_at >= _hour_at_or_after(start))
    if end is not None:
        counter_window.append(UsageCounter.hour_at < end)
        event_window.append(UsageEvent.finished_at < _hour_at_or_after(end))
    rows = session.execute(
        select(
            Adapter.name,
            Tenant.name,
            func.sum(UsageCounter.requests),
            func.sum(UsageCounter.prompt_micro_tokens),
            func.sum(UsageCounter.completion_micro_tokens),
        )
        .select_from(UsageCounter)
        .outerjoin(Adapter, Adapter.id == UsageCounter.adapter_id)
        .outerjoin(Tenant, Tenant.id == Adapter.tenant_id)
        .where(*counter_window)
        .group_by(Adapter.name, Tenant.name)
        .order_by(Adapter.name.nulls_first(), Tenant.name)
    ).all()
    prompts = whole_tokens([int(row[3]) for row in rows])
    completions = whole_tokens([int(row[4]) for row in rows])
    lines = [
        UsageLine(name or "", owner or "", int(requests), prompt, completion)
        for (name, owner, requests, _, _), prompt, completion in zip(rows, prompts, completions, strict=True)
    ]
    total_requests, total_prompt, total_completion = session.execute(
        select(
            func.count(),
            func.coalesce(func.sum(UsageEvent.prompt_tokens), 0),
            func.coalesce(func.sum(UsageEvent.completion_tokens), 0),
        ).where(*event_window)
    ).one()
    return UsageSummary(lines, int(total_requests), int(total_prompt), int(total_completion))
