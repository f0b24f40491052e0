"""Recording usage events idempotently, and reading usage back.

An event is inserted with `INSERT ... ON CONFLICT (tenant_id, request_id) DO NOTHING RETURNING ...`; only
the events really inserted move the hourly counters, in the same transaction, so retries, duplicates
and two workers reporting one request never double count. A batch is validated whole first and then
succeeds or fails atomically. Rows are written in a fixed order (request id, counter key) so that
concurrent batches cannot deadlock. Request ids are chosen by clients, so the key is (tenant, request id):
another tenant sending the same id is another request."""

from __future__ import annotations

import math
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from control_plane.db.base import utc_now
from control_plane.errors import AlreadyExists, InvalidArgument
from control_plane.registry.models import Adapter
from control_plane.tenancy.models import Tenant
from control_plane.text import check_text
from control_plane.usage.models import UsageCounter, UsageEvent, UsageEventAdapter
from control_plane.usage.shares import MICROS, round_half_even, split_micro_tokens, weight_decimal

MAX_REQUEST_ID_CHARS = 128


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


@dataclass(frozen=True)
class ReportOutcome:
    inserted: int
    duplicates: int


def _uuid(value: str, field: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidArgument(f"not a valid id: {value!r}", field=field) from None


def _hour(moment: datetime) -> datetime:
    return moment.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)


@dataclass(frozen=True)
class _Checked:
    report: UsageReport
    tenant_id: uuid.UUID
    adapters: tuple[tuple[uuid.UUID, Decimal], ...]
    finished_at: datetime


def _check(session: Session, reports: list[UsageReport]) -> list[_Checked]:
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
        for name in ("queue_ms", "ttft_ms", "total_ms"):
            value = getattr(r, name)
            if not math.isfinite(value) or value < 0:
                raise InvalidArgument("must be a non-negative finite number", field=f"{where}.{name}")
        adapters = []
        for j, (adapter_id, weight) in enumerate(r.adapters):
            adapters.append(
                (
                    _uuid(adapter_id, f"{where}.adapters[{j}].adapter_id"),
                    weight_decimal(weight, f"{where}.adapters[{j}].weight"),
                )
            )
        if len({a for a, _ in adapters}) != len(adapters):
            raise InvalidArgument("an adapter is listed twice", field=f"{where}.adapters")
        checked.append(
            _Checked(r, _uuid(r.tenant_id, f"{where}.tenant_id"), tuple(adapters), r.finished_at or utc_now())
        )
    tenant_ids = {c.tenant_id for c in checked}
    known_tenants = (
        set(session.scalars(select(Tenant.id).where(Tenant.id.in_(tenant_ids)))) if tenant_ids else set()
    )
    adapter_ids = {a for c in checked for a, _ in c.adapters}
    known_adapters = (
        set(session.scalars(select(Adapter.id).where(Adapter.id.in_(adapter_ids)))) if adapter_ids else set()
    )
    for i, c in enumerate(checked):
        if c.tenant_id not in known_tenants:
            raise InvalidArgument(f"unknown tenant {c.tenant_id}", field=f"events[{i}].tenant_id")
        for j, (adapter_id, _) in enumerate(c.adapters):
            if adapter_id not in known_adapters:
                raise InvalidArgument(
                    f"unknown adapter {adapter_id}", field=f"events[{i}].adapters[{j}].adapter_id"
                )
    return checked


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


def report_usage(session: Session, reports: list[UsageReport]) -> ReportOutcome:
    checked = _check(session, reports)
    unique: dict[tuple[str, str], _Checked] = {}
    for c in checked:
        unique.setdefault((str(c.tenant_id), c.report.request_id), c)
    if not unique:
        return ReportOutcome(0, 0)
    ordered = [unique[k] for k in sorted(unique)]
    inserted_keys = set(
        session.execute(
            insert(UsageEvent)
            .values(
                [
                    {
                        "request_id": c.report.request_id,
                        "tenant_id": c.tenant_id,
                        "worker_id": c.report.worker_id,
                        "base_model": c.report.base_model,
                        "prompt_tokens": c.report.prompt_tokens,
                        "completion_tokens": c.report.completion_tokens,
                        "queue_ms": c.report.queue_ms,
                        "ttft_ms": c.report.ttft_ms,
                        "total_ms": c.report.total_ms,
                        "finish_reason": c.report.finish_reason[:32],
                        "finished_at": c.finished_at,
                        "recorded_at": utc_now(),
                    }
                    for c in ordered
                ]
            )
            .on_conflict_do_nothing(index_elements=["tenant_id", "request_id"])
            .returning(UsageEvent.tenant_id, UsageEvent.request_id)
        )
    )
    inserted_keys = {(tenant_id, request_id) for tenant_id, request_id in inserted_keys}
    new = [c for c in ordered if (c.tenant_id, c.report.request_id) in inserted_keys]
    links = [
        {
            "tenant_id": c.tenant_id,
            "request_id": c.report.request_id,
            "adapter_id": adapter_id,
            "weight": weight,
        }
        for c in new
        for adapter_id, weight in c.adapters
    ]
    if links:
        session.execute(insert(UsageEventAdapter).values(links))
    _add_to_counters(session, new)
    return ReportOutcome(len(new), len(reports) - len(new))


def _add_to_counters(session: Session, events: list[_Checked]) -> None:
    # (tenant, base model, adapter or None, hour) -> [requests, prompt micro-tokens, completion micro-tokens]
    deltas: dict[tuple, list[int]] = defaultdict(lambda: [0, 0, 0])
    for c in events:
        hour = _hour(c.finished_at)
        if not c.adapters:
            delta = deltas[(c.tenant_id, c.report.base_model, None, hour)]
            delta[0] += 1
            delta[1] += c.report.prompt_tokens * MICROS
            delta[2] += c.report.completion_tokens * MICROS
            continue
        weights = [w for _, w in c.adapters]
        prompt_parts = split_micro_tokens(c.report.prompt_tokens, weights)
        completion_parts = split_micro_tokens(c.report.completion_tokens, weights)
        for (adapter_id, _), prompt, completion in zip(
            c.adapters, prompt_parts, completion_parts, strict=True
        ):
            delta = deltas[(c.tenant_id, c.report.base_model, adapter_id, hour)]
            delta[0] += 1
            delta[1] += prompt
            delta[2] += completion
    for key in sorted(deltas, key=lambda k: (str(k[0]), k[1], str(k[2]), k[3])):
        tenant_id, base_model, adapter_id, hour = key
        requests, prompt, completion = deltas[key]
        statement = insert(UsageCounter).values(
            tenant_id=tenant_id,
            base_model=base_model,
            adapter_id=adapter_id,
            hour_at=hour,
            requests=requests,
            prompt_micro_tokens=prompt,
            completion_micro_tokens=completion,
        )
        session.execute(
            statement.on_conflict_do_update(
                constraint="uq_usage_counter_tenant_id_base_model_adapter_id_hour_at",
                set_={
                    "requests": UsageCounter.requests + statement.excluded.requests,
                    "prompt_micro_tokens": UsageCounter.prompt_micro_tokens
                    + statement.excluded.prompt_micro_tokens,
                    "completion_micro_tokens": UsageCounter.completion_micro_tokens
                    + statement.excluded.completion_micro_tokens,
                },
            )
        )


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
    totals; token counts of mixed requests are split by weight and rounded half-even per line."""
    counter_window = [UsageCounter.tenant_id == tenant.id]
    event_window = [UsageEvent.tenant_id == tenant.id]
    hour_of_event = func.date_trunc("hour", UsageEvent.finished_at)
    if start is not None:
        counter_window.append(UsageCounter.hour_at >= start)
        event_window.append(hour_of_event >= start)
    if end is not None:
        counter_window.append(UsageCounter.hour_at < end)
        event_window.append(hour_of_event < end)
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
    lines = [
        UsageLine(
            name or "",
            owner or "",
            int(requests),
            round_half_even(int(prompt), MICROS),
            round_half_even(int(completion), MICROS),
        )
        for name, owner, requests, prompt, completion in rows
    ]
    total_requests, total_prompt, total_completion = session.execute(
        select(
            func.count(),
            func.coalesce(func.sum(UsageEvent.prompt_tokens), 0),
            func.coalesce(func.sum(UsageEvent.completion_tokens), 0),
        ).where(*event_window)
    ).one()
    return UsageSummary(lines, int(total_requests), int(total_prompt), int(total_completion))
