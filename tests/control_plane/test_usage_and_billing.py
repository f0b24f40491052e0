"""Usage reports are counted exactly once, and invoices match figures computed by hand."""

from __future__ import annotations

import random
import threading
from datetime import UTC, datetime, timedelta

import grpc
import psycopg
import pytest

from control_plane.billing import service as billing
from control_plane.usage.shares import round_half_even, split_micro_tokens, whole_tokens
from openlora.v1 import worker_pb2

BASE = "tiny-llama"


def _code(excinfo: pytest.ExceptionInfo) -> grpc.StatusCode:
    return excinfo.value.code()


@pytest.fixture(scope="module")
def world(cp, adapters_root) -> dict:
    """owner has "poet" (royalty 2.0 per M completion tokens) and public "coder" (1.0); user uses them."""
    with cp.admin() as admin:
        ids = {name: admin.create_tenant(name).id for name in ("owner", "user")}
        owner_admin = admin.create_api_key("owner", admin=True).secret
        user_admin = admin.create_api_key("user", admin=True).secret
        admin.set_price(
            BASE, prompt_micros_per_million_tokens=100_000, completion_micros_per_million_tokens=300_000
        )
    with cp.admin(owner_admin) as owner:
        poet = owner.upload_adapter(
            adapters_root / "a",
            name="poet",
            base_model=BASE,
            public=True,
            royalty_micros_per_million_tokens=2_000_000,
        ).adapter.id
        coder = owner.upload_adapter(
            adapters_root / "b",
            name="coder",
            base_model=BASE,
            public=True,
            royalty_micros_per_million_tokens=1_000_000,
        ).adapter.id
    return {
        "tenant": ids,
        "adapter": {"poet": poet, "coder": coder},
        "owner_admin": owner_admin,
        "user_admin": user_admin,
    }


def _event(
    request_id: str,
    tenant_id: str,
    adapters: list[tuple[str, float]],
    prompt: int,
    completion: int,
    when: datetime,
) -> worker_pb2.UsageEvent:
    event = worker_pb2.UsageEvent(
        request_id=request_id,
        tenant_id=tenant_id,
        adapters=[worker_pb2.UsageAdapter(adapter_id=a, weight=w) for a, w in adapters],
        worker_id="w1",
        base_model=BASE,
        prompt_tokens=prompt,
        completion_tokens=completion,
        ttft_ms=12.5,
        total_ms=40.0,
        finish_reason="stop",
    )
    event.finished_at.FromDatetime(when)
    return event


def _tenants(cp, *names: str) -> tuple[dict[str, str], dict[str, str]]:
    """New tenants by name: ({name: tenant id}, {name: admin key secret})."""
    with cp.admin() as admin:
        ids = {name: admin.create_tenant(name).id for name in names}
        keys = {name: admin.create_api_key(name, admin=True).secret for name in names}
    return ids, keys


def _report(cp, events) -> worker_pb2.ReportUsageResponse:
    return cp.worker_stub().ReportUsage(
        worker_pb2.ReportUsageRequest(events=events), metadata=cp.worker_metadata()
    )


MARCH = datetime(2026, 3, 14, 10, 30, tzinfo=UTC)
APRIL = datetime(2026, 4, 2, 8, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def march_usage(cp, world) -> None:
    user, owner = world["tenant"]["user"], world["tenant"]["owner"]
    poet, coder = world["adapter"]["poet"], world["adapter"]["coder"]
    events = [
        _event("r1", user, [(poet, 1.0)], 1000, 2000, MARCH),
        _event("r2", user, [(poet, 0.25), (coder, 0.75)], 400, 800, MARCH),
        _event("r3", user, [], 55, 10, MARCH),
        _event("r4", owner, [(poet, 1.0)], 100, 100, MARCH),
        _event("r5", user, [], 1, 1, APRIL),
    ]
    assert _report(cp, events) == worker_pb2.ReportUsageResponse(inserted=5, duplicates=0)
    # A retry of the whole batch, and r1 once more inside a new batch, change nothing.
    assert _report(cp, events) == worker_pb2.ReportUsageResponse(inserted=0, duplicates=5)
    assert _report(cp, [events[0], events[0]]) == worker_pb2.ReportUsageResponse(inserted=0, duplicates=2)


def test_mixed_request_records_each_adapter_with_its_exact_weight(cp, world, march_usage) -> None:
    with psycopg.connect(cp.config.database_url) as conn:
        rows = conn.execute(
            "SELECT adapter_id::text, weight::text FROM usage_event_adapter WHERE request_id = 'r2' ORDER BY weight"
        ).fetchall()
    assert rows == [(world["adapter"]["poet"], "0.250000"), (world["adapter"]["coder"], "0.750000")]


def test_usage_per_adapter_and_totals(cp, world, march_usage) -> None:
    with cp.admin(world["user_admin"]) as user:
        usage = user.get_usage()
    rows = {
        (r.adapter, r.adapter_tenant): (r.requests, r.prompt_tokens, r.completion_tokens) for r in usage.rows
    }
    assert rows == {
        ("", ""): (2, 56, 11),
        ("poet", "owner"): (2, 1100, 2200),
        ("coder", "owner"): (1, 300, 600),
    }
    assert (usage.total_requests, usage.total_prompt_tokens, usage.total_completion_tokens) == (4, 1456, 2811)
    with cp.admin() as operator:
        april = operator.get_usage("user", start=datetime(2026, 4, 1, tzinfo=UTC))
    assert [(r.adapter, r.requests) for r in april.rows] == [("", 1)] and april.total_requests == 1


def test_invoice_of_a_consumer_matches_hand_computed_figures(cp, world, march_usage) -> None:
    # Prices per million tokens: prompt 0.1 (100_000 micros), completion 0.3 (300_000 micros).
    # poet: r1 (1000, 2000) + a quarter of r2 (100, 200) = (1100, 2200) -> 1100*0.1 + 2200*0.3 = 770 micros
    # coder: three quarters of r2 = (300, 600)                            -> 30 + 180               = 210
    # base alone: r3 (55, 10)                                              -> 5.5 + 3 = 8.5, half-even -> 8
    # royalty paid: poet 2200 * 2.0 = 4400, coder 600 * 1.0 = 600
    with cp.admin(world["user_admin"]) as user:
        invoice = user.get_invoice("2026-03")
    lines = [
        (line.kind, line.adapter, line.prompt_tokens, line.completion_tokens, line.amount_micros)
        for line in invoice.lines
    ]
    assert lines == [
        ("tokens", "", 55, 10, 8),
        ("tokens", "coder", 300, 600, 210),
        ("tokens", "poet", 1100, 2200, 770),
        ("royalty_paid", "coder", 0, 600, 600),
        ("royalty_paid", "poet", 0, 2200, 4400),
    ]
    assert all(line.base_model == BASE for line in invoice.lines)
    assert [line.adapter_owner for line in invoice.lines] == ["", "owner", "owner", "owner", "owner"]
    assert (invoice.charges_micros, invoice.earnings_micros, invoice.net_micros) == (5988, 0, 5988)


def test_invoice_of_an_owner_earns_royalties_and_pays_none_on_its_own_use(cp, world, march_usage) -> None:
    # owner used poet itself: (100, 100) -> 10 + 30 = 40 micros, no royalty.
    # earned: poet 2200 completion tokens by user * 2.0 = 4400; coder 600 * 1.0 = 600.
    with cp.admin(world["owner_admin"]) as owner:
        invoice = owner.get_invoice("2026-03")
    lines = [(line.kind, line.adapter, line.completion_tokens, line.amount_micros) for line in invoice.lines]
    assert lines == [
        ("tokens", "poet", 100, 40),
        ("royalty_earned", "coder", 600, 600),
        ("royalty_earned", "poet", 2200, 4400),
    ]
    assert (invoice.charges_micros, invoice.earnings_micros, invoice.net_micros) == (40, 5000, -4960)
    with psycopg.connect(cp.config.database_url) as conn:
        stored = conn.execute(
            "SELECT net_micros FROM invoice i JOIN tenant t ON t.id = i.tenant_id "
            "WHERE t.name = 'owner' AND period = '2026-03'"
        ).fetchall()
    assert stored == [(-4960,)]


def test_a_usage_window_that_ends_before_it_starts_is_invalid_naming_end(cp, world) -> None:
    from datetime import UTC, datetime

    with cp.admin() as admin, pytest.raises(grpc.RpcError) as e:
        admin.get_usage("user", start=datetime(2026, 5, 2, tzinfo=UTC), end=datetime(2026, 5, 1, tzinfo=UTC))
    assert (
        _code(e) == grpc.StatusCode.INVALID_ARGUMENT and e.value.details() == "end: must not be before start"
    )


def test_only_a_closed_months_invoice_is_stored(cp, world) -> None:
    """A read wrote a row for any month up to 9998: one tenant could write them by the thousand."""
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    current = f"{now.year:04d}-{now.month:02d}"
    with cp.admin(world["owner_admin"]) as owner:
        for period in (current, "9998-12", "2999-01"):
            owner.get_invoice(period)
    with psycopg.connect(cp.config.database_url) as conn:
        stored = conn.execute(
            "SELECT period FROM invoice i JOIN tenant t ON t.id = i.tenant_id "
            "WHERE t.name = 'owner' AND period IN (%s, '9998-12', '2999-01')",
            (current,),
        ).fetchall()
    assert stored == []


def test_an_event_stamped_after_it_arrived_counts_in_the_hour_it_arrived(cp) -> None:
    """A worker whose clock runs ahead stamped its usage in a month no invoice had reached yet (in 9999 no
    invoice can ask for: its tokens were never billed); nothing finishes after it is reported."""
    ids, keys = _tenants(cp, "skewed")
    ahead = [datetime(9999, 12, 31, 23, 30, tzinfo=UTC), datetime.now(UTC) + timedelta(days=400)]
    before = datetime.now(UTC)
    _report(cp, [_event(f"ahead{i}", ids["skewed"], [], 3, 5, when) for i, when in enumerate(ahead)])
    after = datetime.now(UTC)
    with cp.admin(keys["skewed"]) as skewed:
        arrived = skewed.get_usage(start=before - timedelta(hours=1), end=after + timedelta(hours=1))
        invoice = skewed.get_invoice(f"{after.year:04d}-{after.month:02d}")
    totals = (arrived.total_requests, arrived.total_prompt_tokens, arrived.total_completion_tokens)
    assert totals == (2, 6, 10)
    if (before.year, before.month) == (after.year, after.month):  # not reported across a month's end
        assert [(line.prompt_tokens, line.completion_tokens) for line in invoice.lines] == [(6, 10)]


def test_bad_period_is_invalid(cp, world) -> None:
    with cp.admin() as admin:
        for period in ("2026-13", "2026-3", "March", "0000-01", "9999-12"):  # the last two were INTERNAL
            with pytest.raises(grpc.RpcError) as e:
                admin.get_invoice(period, tenant="user")
            assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT and "period" in e.value.details()


def test_concurrent_reports_of_the_same_requests_count_once(cp, world) -> None:
    user, poet = world["tenant"]["user"], world["adapter"]["poet"]
    when = datetime(2026, 5, 1, 12, tzinfo=UTC)
    events = [_event(f"c{i}", user, [(poet, 1.0)], 10, 20, when) for i in range(20)]
    results: list[worker_pb2.ReportUsageResponse] = []
    barrier = threading.Barrier(8)

    def report(seed: int) -> None:
        batch = events[:]
        random.Random(seed).shuffle(batch)
        barrier.wait()
        results.append(_report(cp, batch))

    threads = [threading.Thread(target=report, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.inserted for r in results) == 20
    assert sum(r.duplicates for r in results) == 7 * 20
    with cp.admin() as admin:
        may = admin.get_usage("user", start=when, end=datetime(2026, 5, 2, tzinfo=UTC))
    assert [(r.adapter, r.requests, r.prompt_tokens, r.completion_tokens) for r in may.rows] == [
        ("poet", 20, 200, 400)
    ]


def test_a_batch_with_one_bad_event_records_nothing(cp, world) -> None:
    user = world["tenant"]["user"]
    good = _event("atomic-good", user, [], 1, 1, MARCH)
    bad_events = [
        _event("atomic-bad", "00000000-0000-0000-0000-000000000000", [], 1, 1, MARCH),
        _event("", user, [], 1, 1, MARCH),
        _event("atomic-bad", user, [("00000000-0000-0000-0000-000000000000", 1.0)], 1, 1, MARCH),
    ]  # (a share that bills nothing, a negative one say, is left out and the event recorded: see
    # tests/fusion/test_invoice_request_kinds.py)
    for bad in bad_events:
        with pytest.raises(grpc.RpcError) as e:
            _report(cp, [good, bad])
        assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT and "events[1]" in e.value.details()
    assert _report(cp, [good]).inserted == 1


def test_set_price_is_operator_only(cp, world) -> None:
    with cp.admin(world["user_admin"]) as user, pytest.raises(grpc.RpcError) as e:
        user.set_price(BASE, 1, 1)
    assert _code(e) == grpc.StatusCode.PERMISSION_DENIED


def test_token_split_is_exact_and_rounding_is_half_even() -> None:
    from decimal import Decimal

    assert split_micro_tokens(10, [Decimal(1)] * 3) == [3_333_334, 3_333_333, 3_333_333]
    assert sum(split_micro_tokens(7, [Decimal("0.1"), Decimal("0.7"), Decimal("0.2")])) == 7_000_000
    assert [round_half_even(n, 2) for n in (1, 3, 5, 4)] == [0, 2, 2, 2]


def test_lines_are_rounded_together_to_whole_tokens() -> None:
    assert whole_tokens([333_334, 333_333, 333_333]) == [1, 0, 0]
    assert whole_tokens([1_500_000, 1_500_000]) == [2, 1]  # 3 tokens; the tie goes to the earlier line
    assert whole_tokens([2_400_000, 600_000, 5_000_000]) == [2, 1, 5]
    assert whole_tokens([500_000]) == [0]  # half to even, as a single line always was
    assert whole_tokens([]) == []


def test_usage_lines_of_split_tokens_add_up_to_the_totals(cp, world) -> None:
    """Each request of an even two-adapter mix gives each adapter half a token of prompt and of completion:
    rounded on its own, each line showed 0 (or 1 each) against a total of 3 prompt and completion tokens."""
    ids, keys = _tenants(cp, "halves")
    poet, coder = world["adapter"]["poet"], world["adapter"]["coder"]
    events = [_event(f"h{i}", ids["halves"], [(poet, 0.5), (coder, 0.5)], 1, 1, MARCH) for i in range(3)]
    assert _report(cp, events).inserted == 3
    with cp.admin(keys["halves"]) as tenant:
        usage = tenant.get_usage()
    assert (usage.total_prompt_tokens, usage.total_completion_tokens) == (3, 3)
    assert sum(r.prompt_tokens for r in usage.rows) == 3
    assert sum(r.completion_tokens for r in usage.rows) == 3
    assert sorted(r.prompt_tokens for r in usage.rows) == [1, 2]  # 1.5 each, shown within one token


def test_rates_past_the_bound_are_refused_by_field(cp, world, adapters_root) -> None:
    """A price or royalty above 10^12 micro-units per million tokens (or below 0) is refused naming its
    field: one of 10^18 made invoices overflow int64, an invoice nobody could read."""
    too_high = billing.MAX_RATE_MICROS + 1
    with cp.admin() as admin:
        for prompt, completion, field in ((too_high, 1, "prompt_micros"), (1, -1, "completion_micros")):
            with pytest.raises(grpc.RpcError) as e:
                admin.set_price(
                    BASE,
                    prompt_micros_per_million_tokens=prompt,
                    completion_micros_per_million_tokens=completion,
                )
            assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT and field in e.value.details()
    with cp.admin(world["owner_admin"]) as owner, pytest.raises(grpc.RpcError) as e:
        owner.upload_adapter(
            adapters_root / "a", name="greedy", base_model=BASE, royalty_micros_per_million_tokens=too_high
        )
    assert (
        _code(e) == grpc.StatusCode.INVALID_ARGUMENT
        and "royalty_micros_per_million_tokens" in e.value.details()
    )


def test_a_royalty_can_be_lowered_but_never_raised_under_its_name(cp, world, adapters_root) -> None:
    """Invoices apply the royalty in force when computed: a raise would reprice tokens other tenants used
    before it (an owner billed a user 6,000,008 micros for 8 micros of past use). Refused by field; a
    lower rate is accepted."""

    def upload(royalty: int):
        return owner.upload_adapter(
            adapters_root / "b", name="royal", base_model=BASE, public=True,
            royalty_micros_per_million_tokens=royalty,
        ).adapter  # fmt: skip

    with cp.admin(world["owner_admin"]) as owner:
        upload(5_000)
        with pytest.raises(grpc.RpcError) as e:
            upload(5_001)
        assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION
        assert "royalty_micros_per_million_tokens" in e.value.details()
        assert upload(4_000).royalty_micros_per_million_tokens == 4_000
        # Deleted, the name's row (and the usage priced at its rate) comes back on the next upload: the
        # rule holds across the delete (a delete and re-upload raised past invoices before).
        owner.delete_adapter("royal")
        with pytest.raises(grpc.RpcError) as e:
            upload(1_000_000)
        assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION
        assert upload(4_000).royalty_micros_per_million_tokens == 4_000


def test_two_tenants_adapters_of_one_name_are_billed_apart_each_at_its_owners_royalty(
    cp, adapters_root
) -> None:
    """A tenant used another's public "paid" (royalty 1.0 per M), then uploaded a private "paid" of its own
    and used that: the invoice grouped by name, so it billed the royalty on both (or on neither, depending
    on which row came first). Lines are per adapter, each with its owner."""
    when = datetime(2026, 6, 3, 9, tzinfo=UTC)
    ids, keys = _tenants(cp, "seller", "buyer")
    with cp.admin(keys["seller"]) as seller:
        theirs = seller.upload_adapter(
            adapters_root / "a", name="paid", base_model=BASE, public=True,
            royalty_micros_per_million_tokens=1_000_000,
        ).adapter.id  # fmt: skip
    with cp.admin(keys["buyer"]) as buyer:
        own = buyer.upload_adapter(adapters_root / "b", name="paid", base_model=BASE).adapter.id
    events = [
        _event("same-name-1", ids["buyer"], [(theirs, 1.0)], 10, 8, when),
        _event("same-name-2", ids["buyer"], [(own, 1.0)], 10, 1, when),
    ]
    assert _report(cp, events).inserted == 2
    with cp.admin(keys["buyer"]) as buyer:
        invoice = buyer.get_invoice("2026-06")
    lines = [(line.kind, line.adapter, line.adapter_owner, line.completion_tokens) for line in invoice.lines]
    assert lines == [
        ("tokens", "paid", "buyer", 1),
        ("tokens", "paid", "seller", 8),
        ("royalty_paid", "paid", "seller", 8),
    ]
    assert invoice.lines[2].amount_micros == 8  # 8 tokens at 1.0 per million: 8 micro-units
    with cp.admin(keys["seller"]) as seller:
        earned = [
            (line.kind, line.adapter_owner, line.completion_tokens, line.amount_micros)
            for line in seller.get_invoice("2026-06").lines
        ]
    assert earned == [("royalty_earned", "seller", 8, 8)]


def test_royalties_earned_are_the_sum_of_what_each_payer_paid(cp, adapters_root) -> None:
    """Three tenants each use an adapter at 0.5 micro-units per completion token for 3 tokens: each pays
    1.5, rounded half to even on its own invoice to 2, 6 in all. The owner's line rounded the total once
    (4.5 to 4): 2 micro-units paid and never earned."""
    when = datetime(2026, 7, 3, 9, tzinfo=UTC)
    names = ("half-owner", "payer-a", "payer-b", "payer-c")
    ids, keys = _tenants(cp, *names)
    with cp.admin(keys["half-owner"]) as owner:
        half = owner.upload_adapter(
            adapters_root / "a", name="half", base_model=BASE, public=True,
            royalty_micros_per_million_tokens=500_000,
        ).adapter.id  # fmt: skip
    payers = names[1:]
    events = [_event(f"half-{p}", ids[p], [(half, 1.0)], 1, 3, when) for p in payers]
    assert _report(cp, events).inserted == 3
    paid = 0
    for payer in payers:
        with cp.admin(keys[payer]) as admin:
            paid += sum(
                line.amount_micros
                for line in admin.get_invoice("2026-07").lines
                if line.kind == "royalty_paid"
            )
    with cp.admin(keys["half-owner"]) as owner:
        earned = [line for line in owner.get_invoice("2026-07").lines if line.kind == "royalty_earned"]
    assert paid == 6
    assert [(line.completion_tokens, line.amount_micros) for line in earned] == [(9, paid)]


def test_a_positive_charge_is_never_rounded_to_nothing(cp, world, adapters_root) -> None:
    """Lines are per mix, so a tenant could spread cheap requests over many lines of under half a
    micro-unit each (`world` prices tokens at 0.1 and 0.3), every one rounded to 0: tokens served and
    never billed. A positive line bills at
    least 1 micro-unit, and the royalty its owner earns follows what the payer paid."""
    when = datetime(2026, 8, 5, 9, tzinfo=UTC)
    ids, keys = _tenants(cp, "tiny-owner", "tiny-payer")
    with cp.admin(keys["tiny-owner"]) as owner:
        cheap = [
            owner.upload_adapter(
                adapters_root / source, name=f"cheap-{source}", base_model=BASE, public=True,
                royalty_micros_per_million_tokens=100_000,
            ).adapter.id
            for source in ("a", "b")
        ]  # fmt: skip
    payer = ids["tiny-payer"]
    events = [
        _event("tiny-single", payer, [(cheap[0], 1.0)], 1, 1, when),  # 0.1 + 0.3 micro-units of tokens
        _event("tiny-mix", payer, [(cheap[0], 0.5), (cheap[1], 0.5)], 1, 1, when),
        _event("tiny-base", payer, [], 1, 1, when),
    ]
    assert _report(cp, events).inserted == 3
    with cp.admin(keys["tiny-payer"]) as admin:
        lines = admin.get_invoice("2026-08").lines
    tokens = [line for line in lines if line.kind == "tokens"]
    assert len(tokens) == 3 and all(line.amount_micros == 1 for line in tokens), tokens
    paid = [line.amount_micros for line in lines if line.kind == "royalty_paid"]
    assert paid == [1, 1]  # 0.1 micro-units each
    with cp.admin(keys["tiny-owner"]) as owner:
        earned = [line for line in owner.get_invoice("2026-08").lines if line.kind == "royalty_earned"]
    assert sorted(line.amount_micros for line in earned) == [1, 1]


def test_concurrent_invoices_of_a_closed_month_all_answer_and_one_is_stored(cp, world) -> None:
    """Each computation of a closed month's invoice deleted the stored row, then inserted its own: those
    that ran at once failed on the (tenant, period) unique constraint, INTERNAL."""
    barrier, outcomes, lock = threading.Barrier(8), [], threading.Lock()

    def invoice() -> None:
        with cp.admin(world["user_admin"]) as user:
            barrier.wait()
            try:
                outcome = user.get_invoice("2026-03").net_micros
            except grpc.RpcError as error:
                outcome = error.code()
        with lock:
            outcomes.append(outcome)

    for _ in range(3):
        outcomes.clear()
        threads = [threading.Thread(target=invoice) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(outcomes) == 8 and all(isinstance(o, int) for o in outcomes), outcomes
        assert len(set(outcomes)) == 1
    with psycopg.connect(cp.config.database_url) as conn:
        stored = conn.execute(
            "SELECT count(*) FROM invoice i JOIN tenant t ON t.id = i.tenant_id "
            "WHERE t.name = 'user' AND period = '2026-03'"
        ).fetchone()
    assert stored == (1,)


def test_usage_totals_count_utc_hours_whatever_the_databases_time_zone(cp) -> None:
    """GetUsage's totals truncated events to the hour in the session's time zone, its lines in UTC: on a
    server whose time zone has a fractional offset (Asia/Kolkata, +05:30) the window 10:00-11:00 UTC
    listed the 10:15 request in its lines and counted 0 requests in its totals."""
    import uuid

    from sqlalchemy import text

    from control_plane.db.engine import make_engine, make_sessionmaker
    from control_plane.tenancy.models import Tenant
    from control_plane.usage import service as usage

    def at(hour: int, minute: int = 0, second: int = 0) -> datetime:
        return datetime(2026, 9, 3, hour, minute, second, tzinfo=UTC)

    ids, _ = _tenants(cp, "kolkata")
    assert _report(cp, [_event("tz-1", ids["kolkata"], [], 5, 7, at(10, 15))]).inserted == 1
    engine = make_engine(cp.config.database_url, pool_size=1)
    try:
        with make_sessionmaker(engine).begin() as session:
            session.execute(text("SET LOCAL TIME ZONE 'Asia/Kolkata'"))
            tenant = session.get(Tenant, uuid.UUID(ids["kolkata"]))
            for start, end, expected in [
                (at(10), at(11), (1, 5, 7)),
                (at(9, 45), at(10, 30), (1, 5, 7)),  # the hour 10:00 lies in the window
                (at(10, 0, 1), at(11), (0, 0, 0)),
                (at(9, 30), at(10), (0, 0, 0)),
            ]:
                summary = usage.get_usage(session, tenant, start, end)
                totals = (
                    summary.total_requests,
                    summary.total_prompt_tokens,
                    summary.total_completion_tokens,
                )
                assert totals == expected, (start, end)
                assert sum(line.requests for line in summary.lines) == expected[0], (start, end)
    finally:
        engine.dispose()


def test_royalty_earned_shows_the_tokens_its_payers_lines_show(cp, adapters_root) -> None:
    """Two tenants each pay a royalty on a third of 2 completion tokens of an ensemble (0.666667 tokens,
    shown as 1 on each payer's line): the owner's line rounded the sum once (1.333333 -> 1), one token
    fewer than its payers' lines hold, while its amount is their amounts' sum."""
    when = datetime(2026, 10, 3, 9, tzinfo=UTC)
    ids, keys = _tenants(cp, "third-owner", "third-a", "third-b")
    with cp.admin(keys["third-owner"]) as owner:
        third = owner.upload_adapter(
            adapters_root / "a", name="third", base_model=BASE, public=True,
            royalty_micros_per_million_tokens=1_000_000,
        ).adapter.id  # fmt: skip
    events = []
    for payer in ("third-a", "third-b"):
        event = _event(f"third-{payer}", ids[payer], [(third, 1 / 3)], 2, 2, when)
        event.request_kind = "ensemble"
        events.append(event)
    assert _report(cp, events).inserted == 2
    paid = []
    for payer in ("third-a", "third-b"):
        with cp.admin(keys[payer]) as admin:
            paid += [line for line in admin.get_invoice("2026-10").lines if line.kind == "royalty_paid"]
    with cp.admin(keys["third-owner"]) as owner:
        earned = [line for line in owner.get_invoice("2026-10").lines if line.kind == "royalty_earned"]
    assert [(line.completion_tokens, line.amount_micros) for line in paid] == [(1, 1), (1, 1)]
    assert [(line.completion_tokens, line.amount_micros) for line in earned] == [(2, 2)]


def test_past_the_mix_line_bound_the_smallest_mixes_fold_into_one_line(cp, world, monkeypatch) -> None:
    """Each mix has its own tokens line, named by up to 8 adapter names: a tenant sending ~8,200 distinct
    mixes made its invoice larger than a gRPC message (8 MiB), and nobody could read it. Past
    MAX_MIX_LINES the smallest mixes fold into one line per base model and kind; tokens and totals keep."""
    from control_plane.billing import service as billing

    monkeypatch.setattr(billing, "MAX_MIX_LINES", 2)
    ids, keys = _tenants(cp, "many-mixes")
    poet, coder = world["adapter"]["poet"], world["adapter"]["coder"]
    may = datetime(2026, 5, 3, 9, 0, tzinfo=UTC)
    events = []
    for i, completion in enumerate((50, 40, 30, 20, 10)):
        event = _event(f"mm{i}", ids["many-mixes"], [(poet, 0.5), (coder, 0.5)], 10, completion, may)
        event.request_kind, event.mix_name = "linear_mix", f"saved{i}"
        events.append(event)
    assert _report(cp, events).inserted == 5
    with cp.admin(keys["many-mixes"]) as tenant:
        invoice = tenant.get_invoice("2026-05")
    mix_lines = {line.mix: (line.prompt_tokens, line.completion_tokens) for line in invoice.lines if line.mix}
    assert mix_lines == {"saved0": (10, 50), "saved1": (10, 40), "(3 other mixes)": (30, 60)}
    assert invoice.charges_micros == sum(
        line.amount_micros for line in invoice.lines if line.kind != "royalty_earned"
    )
