"""Prices and monthly invoices, computed from the hourly usage counters in exact integer arithmetic.

For a tenant T and a calendar month (UTC):

- "tokens" per (base model, adapter) T used alone (an adapter is its id: two tenants' adapters of one name,
  or a name used before and after its owner changed, are separate lines, each with its owner), and per (base model, request kind, mix) for mixes,
  merges and ensembles (one line for all of a mix's tokens, whatever its members): (prompt micro-tokens
  * prompt price + completion micro-tokens * completion price) / 1e12, prices in micro-units per million
  tokens; a record of a worker that did not say its kind counts per adapter, as before kinds;
- "royalty_paid" per adapter of ANOTHER tenant T used: completion micro-tokens * the owner's royalty
  per million completion tokens / 1e12; an adapter of a linear mix or a merge earns on every completion
  token of the request (the caller's weights do not dilute it), an ensemble's member on its weight's
  share (the counters' royalty_micro_tokens);
- "royalty_earned" per adapter T owns that other tenants used, same formula (T's own use pays none).

Each line's amount is rounded once, half to even, to whole micro-units, except that a positive amount is
at least 1 (`_amount`: lines a tenant can multiply, one per mix, would each round a few cheap tokens to
nothing; a royalty earned is the sum of its payers' lines, so it follows them). Charges = tokens + royalty_paid,
earnings = royalty_earned, net = charges - earnings. Prices and royalty rates are those in force when
the invoice is computed; a base model without a price is charged 0.
"""

from __future__ import annotations

import re
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from control_plane.billing.models import InvoiceLineRow, InvoiceRow, Price
from control_plane.db.base import lock_until_commit, utc_now
from control_plane.errors import InvalidArgument
from control_plane.registry.models import Adapter
from control_plane.tenancy.models import Tenant
from control_plane.text import check_text
from control_plane.usage.models import UsageCounter
from control_plane.usage.service import SINGLE_KINDS
from control_plane.usage.shares import MICROS, round_half_even
from openlora.text_rules import quoted

PERIOD = re.compile(r"^(?P<year>[0-9]{4})-(?P<month>0[1-9]|1[0-2])$")
TOKENS, ROYALTY_PAID, ROYALTY_EARNED = "tokens", "royalty_paid", "royalty_earned"
_KIND_ORDER = {TOKENS: 0, ROYALTY_PAID: 1, ROYALTY_EARNED: 2}
# micro-tokens (1e6 per token) times a price per million tokens (1e6 tokens): divide by 1e12.
_AMOUNT_DIVISOR = MICROS * 1_000_000
# Mix lines an invoice shows one by one; past them, the smallest are folded into one line per base model and
# kind. A spelled-out mix's line is named by up to 8 adapter names (about 1 KiB): a tenant sending
# thousands of distinct mixes made its invoice larger than a gRPC message may be, and nobody, the operator
# included, could read it.
MAX_MIX_LINES = 1000


@dataclass(frozen=True)
class InvoiceLine:
    kind: str
    base_model: str
    adapter: str  # "" on a mix's tokens line
    prompt_tokens: int
    completion_tokens: int
    amount_micros: int
    # Tokens lines: "single", "linear_mix", "merge:<method>", "ensemble", or "" (per adapter, kind unknown).
    request_kind: str = ""
    mix: str = ""  # a mix's tokens line: the saved mix's name or its adapters' names joined by "+"
    adapter_owner: str = ""  # the tenant that owns `adapter` ("" when there is none)


@dataclass(frozen=True)
class Invoice:
    tenant: str
    period: str
    lines: list[InvoiceLine]
    charges_micros: int
    earnings_micros: int
    net_micros: int
    computed_at: datetime


# The highest price or royalty, micro-units per million tokens (a million units per million tokens): it keeps
# every invoice amount within int64 for 10^12 tokens, so no rate can make an invoice unrepresentable.
MAX_RATE_MICROS = 10**12


def check_rate(value: int, field: str) -> None:
    """A price or royalty rate: 0..MAX_RATE_MICROS micro-units per million tokens."""
    if not 0 <= value <= MAX_RATE_MICROS:
        raise InvalidArgument(
            f"must lie in [0, {MAX_RATE_MICROS}] micro-units per million tokens", field=field
        )


def set_price(session: Session, base_model: str, prompt_micros: int, completion_micros: int) -> Price:
    if not base_model:
        raise InvalidArgument("required", field="base_model")
    check_text(base_model, "base_model", 128)
    check_rate(prompt_micros, "prompt_micros_per_million_tokens")
    check_rate(completion_micros, "completion_micros_per_million_tokens")
    statement = insert(Price).values(
        base_model=base_model,
        prompt_micros_per_million_tokens=prompt_micros,
        completion_micros_per_million_tokens=completion_micros,
        updated_at=utc_now(),
    )
    session.execute(
        statement.on_conflict_do_update(
            index_elements=["base_model"],
            set_={
                "prompt_micros_per_million_tokens": statement.excluded.prompt_micros_per_million_tokens,
                "completion_micros_per_million_tokens": statement.excluded.completion_micros_per_million_tokens,
                "updated_at": statement.excluded.updated_at,
            },
        )
    )
    return session.get(Price, base_model)


def period_bounds(period: str) -> tuple[datetime, datetime]:
    """ "YYYY-MM" -> [first instant of the month, first instant of the next) in UTC."""
    match = PERIOD.fullmatch(period)
    if not match:
        raise InvalidArgument(f"must be YYYY-MM, got {quoted(period)}", field="period")
    year, month = int(match["year"]), int(match["month"])
    if not 1 <= year <= 9998:  # a month whose first and next-month instants datetime can hold
        raise InvalidArgument(f"year must lie in [0001, 9998], got {quoted(period)}", field="period")
    start = datetime(year, month, 1, tzinfo=UTC)
    end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
    return start, end


def _consumption(session: Session, tenant_id: uuid.UUID, start: datetime, end: datetime):
    """(base model, request kind, mix, adapter id, adapter name, owner id, owner name, royalty, prompt
    micro-tokens, completion micro-tokens, royalty micro-tokens) of T."""
    return session.execute(
        select(
            UsageCounter.base_model,
            UsageCounter.request_kind,
            UsageCounter.mix,
            Adapter.id,
            Adapter.name,
            Adapter.tenant_id,
            Tenant.name,
            Adapter.royalty_micros_per_million_tokens,
            func.sum(UsageCounter.prompt_micro_tokens),
            func.sum(UsageCounter.completion_micro_tokens),
            func.sum(UsageCounter.royalty_micro_tokens),
        )
        .select_from(UsageCounter)
        .outerjoin(Adapter, Adapter.id == UsageCounter.adapter_id)
        .outerjoin(Tenant, Tenant.id == Adapter.tenant_id)
        .where(UsageCounter.tenant_id == tenant_id, UsageCounter.hour_at >= start, UsageCounter.hour_at < end)
        .group_by(UsageCounter.base_model, UsageCounter.request_kind, UsageCounter.mix, Adapter.id, Tenant.id)
    ).all()


@dataclass
class _Used:
    """One adapter's (or the base model's) use by T: its single requests' tokens and every completion
    micro-token a royalty is due on (mixes included)."""

    name: str | None
    owner_id: uuid.UUID | None
    owner_name: str
    royalty: int | None
    prompt_mt: int = 0
    completion_mt: int = 0
    royalty_completion_mt: int = 0
    request_kinds: set[str] = field(default_factory=set)


def _amount(micro_tokens_times_rate: int) -> int:
    """Micro-tokens times a rate per million tokens, in whole micro-units: half to even, at least 1 when
    positive."""
    amount = round_half_even(micro_tokens_times_rate, _AMOUNT_DIVISOR)
    return max(amount, 1) if micro_tokens_times_rate > 0 else amount


def _tokens_line(
    price: Price | None, base_model: str, adapter: str, prompt_mt: int, completion_mt: int, **kind
):
    amount = 0
    if price is not None:
        amount = _amount(
            prompt_mt * price.prompt_micros_per_million_tokens
            + completion_mt * price.completion_micros_per_million_tokens
        )
    prompt_tokens, completion_tokens = (
        round_half_even(prompt_mt, MICROS),
        round_half_even(completion_mt, MICROS),
    )
    return InvoiceLine(TOKENS, base_model, adapter, prompt_tokens, completion_tokens, amount, **kind)


def _earned(session: Session, tenant_id: uuid.UUID, start: datetime, end: datetime):
    """(base model, adapter name, completion tokens, amount in micros) others generated with T's adapters
    that carry a royalty. The tokens and the amount are the sums of what each paying tenant's invoice
    shows (each rounded there on its own): rounded once over all payers, what the owner earned and what
    the payers paid differed (the tokens too, by one where payers' weighted shares rounded apart)."""
    rows = session.execute(
        select(
            UsageCounter.base_model,
            Adapter.id,
            Adapter.name,
            Adapter.royalty_micros_per_million_tokens,
            func.sum(UsageCounter.royalty_micro_tokens),
        )
        .select_from(UsageCounter)
        .join(Adapter, Adapter.id == UsageCounter.adapter_id)
        .where(
            Adapter.tenant_id == tenant_id,
            UsageCounter.tenant_id != tenant_id,
            UsageCounter.hour_at >= start,
            UsageCounter.hour_at < end,
        )
        .group_by(UsageCounter.base_model, Adapter.id, UsageCounter.tenant_id)
    ).all()
    earned: dict[tuple[str, uuid.UUID], list] = {}
    for base_model, adapter_id, name, royalty, paid_mt in rows:
        if not royalty:
            continue
        line = earned.setdefault((base_model, adapter_id), [base_model, name, 0, 0])
        line[2] += round_half_even(int(paid_mt), MICROS)  # as that payer's line shows them
        line[3] += _amount(int(paid_mt) * royalty)
    return [tuple(line) for line in earned.values()]


def _fold_mixes(mixes: dict[tuple[str, str, str], list[int]]) -> dict[tuple[str, str, str], list[int]]:
    """The mix lines to show: all of them up to MAX_MIX_LINES; past that the MAX_MIX_LINES largest (by
    micro-tokens, then name), and the rest summed into one line per (base model, kind) whose mix reads
    "(N other mixes)". The tokens and the totals are unchanged; a folded line is rounded once."""
    if len(mixes) <= MAX_MIX_LINES:
        return mixes
    ranked = sorted(mixes.items(), key=lambda item: (-(item[1][0] + item[1][1]), item[0]))
    shown = dict(ranked[:MAX_MIX_LINES])
    folded: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for (base_model, request_kind, _), (prompt_mt, completion_mt) in ranked[MAX_MIX_LINES:]:
        entry = folded[(base_model, request_kind)]
        entry[0] += prompt_mt
        entry[1] += completion_mt
        entry[2] += 1
    for (base_model, request_kind), (prompt_mt, completion_mt, count) in folded.items():
        shown[(base_model, request_kind, f"({count} other mixes)")] = [prompt_mt, completion_mt]
    return shown


def compute_invoice(session: Session, tenant: Tenant, period: str) -> Invoice:
    """Computes the invoice from the counters; stores it when the period has ended."""
    start, end = period_bounds(period)
    prices = {p.base_model: p for p in session.scalars(select(Price))}
    lines: list[InvoiceLine] = []
    used: dict[tuple[str, uuid.UUID | None], _Used] = {}
    mixes: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])
    for row in _consumption(session, tenant.id, start, end):
        base_model, request_kind, mix, adapter_id, name, owner_id, owner_name, royalty = row[:8]
        prompt_mt, completion_mt, royalty_mt = (int(v) for v in row[8:])
        one = used.setdefault((base_model, adapter_id), _Used(name, owner_id, owner_name or "", royalty))
        one.royalty_completion_mt += royalty_mt
        if request_kind in SINGLE_KINDS:
            one.prompt_mt += prompt_mt
            one.completion_mt += completion_mt
            one.request_kinds.add(request_kind)
        else:  # a mix's members' shares add up to its whole tokens
            mixes[(base_model, request_kind, mix)][0] += prompt_mt
            mixes[(base_model, request_kind, mix)][1] += completion_mt
    for (base_model, adapter_id), one in used.items():
        if one.request_kinds:
            kind = "single" if one.request_kinds == {"single"} else ""
            lines.append(
                _tokens_line(
                    prices.get(base_model),
                    base_model,
                    one.name or "",
                    one.prompt_mt,
                    one.completion_mt,
                    request_kind=kind,
                    adapter_owner=one.owner_name,
                )
            )
        if adapter_id is not None and one.owner_id != tenant.id and one.royalty:
            lines.append(
                InvoiceLine(
                    ROYALTY_PAID,
                    base_model,
                    one.name,
                    0,
                    round_half_even(one.royalty_completion_mt, MICROS),
                    _amount(one.royalty_completion_mt * one.royalty),
                    adapter_owner=one.owner_name,
                )
            )
    for (base_model, request_kind, mix), (prompt_mt, completion_mt) in _fold_mixes(mixes).items():
        lines.append(
            _tokens_line(
                prices.get(base_model),
                base_model,
                "",
                prompt_mt,
                completion_mt,
                request_kind=request_kind,
                mix=mix,
            )
        )
    for base_model, adapter, completion_tokens, amount in _earned(session, tenant.id, start, end):
        lines.append(
            InvoiceLine(
                ROYALTY_EARNED,
                base_model,
                adapter,
                0,
                completion_tokens,
                amount,
                adapter_owner=tenant.name,
            )
        )
    lines.sort(
        key=lambda line: (
            _KIND_ORDER[line.kind],
            line.base_model,
            line.adapter,
            line.adapter_owner,
            line.request_kind,
            line.mix,
        )
    )
    charges = sum(line.amount_micros for line in lines if line.kind != ROYALTY_EARNED)
    earnings = sum(line.amount_micros for line in lines if line.kind == ROYALTY_EARNED)
    invoice = Invoice(tenant.name, period, lines, charges, earnings, charges - earnings, utc_now())
    if end <= invoice.computed_at:
        # Only a closed month's invoice is kept (replacing an earlier computation): one for the running
        # month would change, and one for any month up to 9998 let a tenant write rows by the thousand.
        _store(session, tenant.id, invoice)
    return invoice


def _store(session: Session, tenant_id: uuid.UUID, invoice: Invoice) -> None:
    # Concurrent computations of one invoice each deleted the stored row (seeing none of the others' new
    # one) and inserted theirs: all but one failed on the (tenant, period) unique constraint, INTERNAL.
    # Serialized until the transaction ends: each replaces the row the one before stored.
    lock_until_commit(session, f"invoice:{tenant_id}:{invoice.period}")
    session.execute(
        delete(InvoiceRow).where(InvoiceRow.tenant_id == tenant_id, InvoiceRow.period == invoice.period)
    )
    row = InvoiceRow(
        tenant_id=tenant_id,
        period=invoice.period,
        charges_micros=invoice.charges_micros,
        earnings_micros=invoice.earnings_micros,
        net_micros=invoice.net_micros,
        computed_at=invoice.computed_at,
    )
    session.add(row)
    session.flush()
    session.add_all(
        InvoiceLineRow(
            invoice_id=row.id,
            kind=line.kind,
            base_model=line.base_model,
            adapter=line.adapter,
            prompt_tokens=line.prompt_tokens,
            completion_tokens=line.completion_tokens,
            amount_micros=line.amount_micros,
            request_kind=line.request_kind,
            mix=line.mix,
            adapter_owner=line.adapter_owner,
        )
        for line in invoice.lines
    )
