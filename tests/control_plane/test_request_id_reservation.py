"""ReserveRequestId / ReleaseRequestId: one worker at a time serves a tenant's client request id, a billed
id stays refused, an id whose stream delivered nothing becomes usable again."""

from __future__ import annotations

import threading
import time
import uuid

import grpc
import pytest

from openlora.v1 import worker_pb2

BASE = "tiny-llama"


@pytest.fixture(scope="module")
def tenant_id(cp) -> str:
    with cp.admin() as admin:
        admin.create_tenant("reserver")
        key = admin.create_api_key("reserver").secret
    response = cp.worker_stub().Authorize(
        worker_pb2.AuthorizeRequest(api_key=key, base_model=BASE), metadata=cp.worker_metadata()
    )
    return response.tenant_id


def _reserve(cp, tenant_id: str, request_id: str, worker_id: str, ttl_ms: int = 0) -> grpc.StatusCode:
    try:
        cp.worker_stub().ReserveRequestId(
            worker_pb2.ReserveRequestIdRequest(
                tenant_id=tenant_id, request_id=request_id, worker_id=worker_id, ttl_ms=ttl_ms
            ),
            metadata=cp.worker_metadata(),
        )
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def _release(cp, tenant_id: str, request_id: str, worker_id: str) -> bool:
    return (
        cp.worker_stub()
        .ReleaseRequestId(
            worker_pb2.ReleaseRequestIdRequest(
                tenant_id=tenant_id, request_id=request_id, worker_id=worker_id
            ),
            metadata=cp.worker_metadata(),
        )
        .released
    )


def _report(cp, tenant_id: str, request_id: str, completion_tokens: int = 3) -> int:
    event = worker_pb2.UsageEvent(
        request_id=request_id,
        tenant_id=tenant_id,
        base_model=BASE,
        prompt_tokens=2,
        completion_tokens=completion_tokens,
        worker_id="w-a",
    )
    return (
        cp.worker_stub()
        .ReportUsage(worker_pb2.ReportUsageRequest(events=[event]), metadata=cp.worker_metadata())
        .inserted
    )


def test_two_workers_racing_for_one_request_id_exactly_one_wins(cp, tenant_id) -> None:
    request_id = f"race-{uuid.uuid4().hex}"
    codes: list[grpc.StatusCode] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def race(worker: int) -> None:
        start.wait()
        code = _reserve(cp, tenant_id, request_id, f"w-{worker}")
        with lock:
            codes.append(code)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(codes, key=lambda c: c.name) == [grpc.StatusCode.ALREADY_EXISTS] * 7 + [grpc.StatusCode.OK]


def test_reserved_id_does_not_refuse_the_streams_own_usage_and_then_stays_refused(cp, tenant_id) -> None:
    request_id = f"billed-{uuid.uuid4().hex}"
    assert _reserve(cp, tenant_id, request_id, "w-a") == grpc.StatusCode.OK
    assert _report(cp, tenant_id, request_id) == 1  # the reservation never blocks its own usage
    # Released or not, a billed id is refused to every worker, the one that served it included.
    _release(cp, tenant_id, request_id, "w-a")
    for worker in ("w-a", "w-b"):
        assert _reserve(cp, tenant_id, request_id, worker) == grpc.StatusCode.ALREADY_EXISTS


def test_released_unbilled_id_is_reusable_by_another_worker(cp, tenant_id) -> None:
    request_id = f"released-{uuid.uuid4().hex}"
    assert _reserve(cp, tenant_id, request_id, "w-a") == grpc.StatusCode.OK
    assert _reserve(cp, tenant_id, request_id, "w-b") == grpc.StatusCode.ALREADY_EXISTS
    assert not _release(cp, tenant_id, request_id, "w-b")  # only the holder releases
    assert _release(cp, tenant_id, request_id, "w-a")
    assert _reserve(cp, tenant_id, request_id, "w-b") == grpc.StatusCode.OK


def test_expired_reservation_is_reusable_and_the_holder_may_renew(cp, tenant_id) -> None:
    request_id = f"expiring-{uuid.uuid4().hex}"
    assert _reserve(cp, tenant_id, request_id, "w-a", ttl_ms=1000) == grpc.StatusCode.OK
    assert _reserve(cp, tenant_id, request_id, "w-a", ttl_ms=1000) == grpc.StatusCode.OK  # its own: renewed
    assert _reserve(cp, tenant_id, request_id, "w-b") == grpc.StatusCode.ALREADY_EXISTS
    time.sleep(1.2)  # the holder died without releasing: the id lapses
    assert _reserve(cp, tenant_id, request_id, "w-b") == grpc.StatusCode.OK


def test_another_tenants_reservation_of_the_same_id_is_its_own(cp, tenant_id) -> None:
    with cp.admin() as admin:
        admin.create_tenant("other-reserver")
        key = admin.create_api_key("other-reserver").secret
    other = (
        cp.worker_stub()
        .Authorize(worker_pb2.AuthorizeRequest(api_key=key, base_model=BASE), metadata=cp.worker_metadata())
        .tenant_id
    )
    request_id = f"shared-{uuid.uuid4().hex}"
    assert _reserve(cp, tenant_id, request_id, "w-a") == grpc.StatusCode.OK
    assert _reserve(cp, other, request_id, "w-b") == grpc.StatusCode.OK


def test_reserve_refuses_bad_input_and_foreign_callers(cp, tenant_id) -> None:
    assert _reserve(cp, "not-a-uuid", "r", "w") == grpc.StatusCode.INVALID_ARGUMENT
    assert _reserve(cp, tenant_id, "", "w") == grpc.StatusCode.INVALID_ARGUMENT
    assert _reserve(cp, tenant_id, "x" * 129, "w") == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as e:
        cp.worker_stub().ReserveRequestId(
            worker_pb2.ReserveRequestIdRequest(tenant_id=tenant_id, request_id="r", worker_id="w"),
            metadata=cp.worker_metadata("not-the-worker-token"),
        )
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_restarted_worker_gives_back_its_reservations_but_those_it_still_bills(cp, tenant_id):
    """A worker killed before its streams delivered anything held their ids until the reservations lapsed
    (a retry on another worker was refused ALREADY_EXISTS meanwhile). Restarted, it releases them all but
    the ids its spool still bills; another worker's reservations are untouched."""
    ids = [f"restart-{i}-{uuid.uuid4().hex}" for i in range(3)]
    mine, other = f"w-{uuid.uuid4().hex[:8]}", f"v-{uuid.uuid4().hex[:8]}"
    for request_id in ids:  # the kept one lapses while the worker restarts: it is reserved again
        ttl_ms = 1000 if request_id == ids[1] else 0
        assert _reserve(cp, tenant_id, request_id, mine, ttl_ms) == grpc.StatusCode.OK
    time.sleep(1.2)
    theirs = f"theirs-{uuid.uuid4().hex}"
    assert _reserve(cp, tenant_id, theirs, other) == grpc.StatusCode.OK
    keep = [worker_pb2.RequestIdKey(tenant_id=tenant_id, request_id=ids[1])]
    released = (
        cp.worker_stub()
        .ReleaseWorkerRequestIds(
            worker_pb2.ReleaseWorkerRequestIdsRequest(worker_id=mine, keep=keep),
            metadata=cp.worker_metadata(),
        )
        .released
    )
    assert released == 2
    codes = [_reserve(cp, tenant_id, request_id, other) for request_id in ids]
    assert codes == [grpc.StatusCode.OK, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.OK]
    assert _reserve(cp, tenant_id, theirs, mine) == grpc.StatusCode.ALREADY_EXISTS  # not mine to release
    with pytest.raises(grpc.RpcError) as refused:
        cp.worker_stub().ReleaseWorkerRequestIds(
            worker_pb2.ReleaseWorkerRequestIdsRequest(worker_id=mine),
            metadata=(("authorization", "Bearer x"),),
        )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_reservation_holds_its_time_to_live_not_as_long_as_the_clock_stepped_back(
    cp, tenant_id, monkeypatch
) -> None:
    """A reservation stamped before the control plane's clock stepped back an hour held for that hour more:
    its worker died, and retries under the id were refused all along. It holds its time to live from the
    first reservation that finds it stamped ahead of the clock; never less (its holder may be serving)."""
    from datetime import timedelta

    from control_plane.db.base import utc_now

    request_id = f"stepped-{uuid.uuid4().hex}"
    assert _reserve(cp, tenant_id, request_id, "died", ttl_ms=1000) == grpc.StatusCode.OK
    ahead = [timedelta(hours=-1)]
    monkeypatch.setattr("control_plane.usage.reservation.utc_now", lambda: utc_now() + ahead[0])
    assert _reserve(cp, tenant_id, request_id, "retry") == grpc.StatusCode.ALREADY_EXISTS
    ahead[0] += timedelta(seconds=2)  # its second of life is over
    assert _reserve(cp, tenant_id, request_id, "retry") == grpc.StatusCode.OK


def test_lapsed_reservations_are_swept_by_later_ones(cp, tenant_id, database_url, monkeypatch) -> None:
    """Rows of reservations that lapsed (their workers died) do not pile up: every SWEEP_EVERY-th
    reservation removes expired rows, and live ones stay."""
    from datetime import timedelta

    from sqlalchemy import create_engine, text

    from control_plane.db.base import utc_now
    from control_plane.usage import reservation

    prefix = f"swept-{uuid.uuid4().hex}"
    for i in range(20):
        assert _reserve(cp, tenant_id, f"{prefix}-lapsed-{i}", "died", ttl_ms=1000) == grpc.StatusCode.OK
    monkeypatch.setattr("control_plane.usage.reservation.utc_now", lambda: utc_now() + timedelta(seconds=2))
    for i in range(reservation.SWEEP_EVERY):  # one of them sweeps, whatever the count before
        assert _reserve(cp, tenant_id, f"{prefix}-live-{i}", "alive") == grpc.StatusCode.OK
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                text(
                    "SELECT worker_id, count(*) FROM request_id_reservation WHERE request_id LIKE :p GROUP BY 1"
                ),
                {"p": f"{prefix}-%"},
            ).all()
    finally:
        engine.dispose()
    assert dict(rows) == {"alive": reservation.SWEEP_EVERY}


def _reserve_many(
    cp, entries: list[tuple[str, str, str]], metadata=None
) -> list[tuple[grpc.StatusCode, str]]:
    response = cp.worker_stub().ReserveRequestIds(
        worker_pb2.ReserveRequestIdsRequest(
            entries=[
                worker_pb2.ReserveRequestIdRequest(tenant_id=t, request_id=r, worker_id=w)
                for t, r, w in entries
            ]
        ),
        metadata=cp.worker_metadata() if metadata is None else metadata,
    )
    codes = {status.value[0]: status for status in grpc.StatusCode}
    return [(codes[o.code], o.field) for o in response.outcomes]


def test_a_batch_answers_each_entry_as_its_own_call_would_in_order(cp, tenant_id) -> None:
    fresh, billed, held, renewed, twice = (
        f"{k}-{uuid.uuid4().hex}" for k in ("fresh", "billed", "held", "own", "2x")
    )
    assert _reserve(cp, tenant_id, billed, "w-a") == grpc.StatusCode.OK
    assert _report(cp, tenant_id, billed) == 1
    assert _reserve(cp, tenant_id, held, "w-other") == grpc.StatusCode.OK
    assert _reserve(cp, tenant_id, renewed, "w-a") == grpc.StatusCode.OK
    outcomes = _reserve_many(
        cp,
        [
            (tenant_id, fresh, "w-a"),
            (tenant_id, billed, "w-a"),
            (tenant_id, held, "w-a"),
            (tenant_id, renewed, "w-a"),  # its own reservation: renewed
            ("not-a-uuid", fresh, "w-a"),
            (tenant_id, "", "w-a"),
            (tenant_id, twice, "w-a"),
            (tenant_id, twice, "w-b"),  # the entry before holds it now: one transaction, still atomic
        ],
    )
    assert outcomes == [
        (grpc.StatusCode.OK, ""),
        (grpc.StatusCode.ALREADY_EXISTS, "request_id"),
        (grpc.StatusCode.ALREADY_EXISTS, "request_id"),
        (grpc.StatusCode.OK, ""),
        (grpc.StatusCode.INVALID_ARGUMENT, "tenant_id"),
        (grpc.StatusCode.INVALID_ARGUMENT, "request_id"),
        (grpc.StatusCode.OK, ""),
        (grpc.StatusCode.ALREADY_EXISTS, "request_id"),
    ]
    # What the batch reserved holds against single calls of other workers.
    assert _reserve(cp, tenant_id, fresh, "w-b") == grpc.StatusCode.ALREADY_EXISTS
    assert _reserve(cp, tenant_id, twice, "w-c") == grpc.StatusCode.ALREADY_EXISTS


def test_a_batch_is_refused_whole_without_a_worker_token_or_past_its_size(cp, tenant_id) -> None:
    entry = (tenant_id, f"t-{uuid.uuid4().hex}", "w-a")
    with pytest.raises(grpc.RpcError) as refused:
        _reserve_many(cp, [entry], metadata=(("authorization", "Bearer wrong"),))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as refused:
        _reserve_many(cp, [(tenant_id, f"n{i}-{uuid.uuid4().hex}", "w-a") for i in range(257)])
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "entries" in refused.value.details()
    assert _reserve(cp, tenant_id, entry[1], "w-b") == grpc.StatusCode.OK  # nothing of either was kept


def test_a_value_the_database_refuses_costs_the_other_entries_of_its_batch_nothing(
    cp, tenant_id, monkeypatch
):
    """The database refusing one entry's statement rolls the batch's transaction back: every entry is
    then answered in a transaction of its own, the refused one INVALID_ARGUMENT, the others reserved."""
    from sqlalchemy.exc import DataError

    from control_plane.usage import reservation

    real, real_batch = reservation.reserve_request_id, reservation.reserve_request_ids
    poisoned = f"poison-{uuid.uuid4().hex}"

    def refusing(session, tenant, request_id, worker_id, ttl_ms=0, sweep=True):
        outcome = real(session, tenant, request_id, worker_id, ttl_ms, sweep)
        if request_id == poisoned:
            raise DataError("INSERT ...", {}, Exception("value too long"))
        return outcome

    def refusing_batch(session, entries):  # the batch's statement, with the poisoned entry among its rows
        outcomes = real_batch(session, entries)
        if any(entry[1] == poisoned for entry in entries):
            raise DataError("INSERT ...", {}, Exception("value too long"))
        return outcomes

    monkeypatch.setattr(reservation, "reserve_request_id", refusing)
    monkeypatch.setattr(reservation, "reserve_request_ids", refusing_batch)
    before, after = f"a-{uuid.uuid4().hex}", f"b-{uuid.uuid4().hex}"
    outcomes = _reserve_many(
        cp, [(tenant_id, before, "w-a"), (tenant_id, poisoned, "w-a"), (tenant_id, after, "w-a")]
    )
    assert [code for code, _ in outcomes] == [
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.OK,
    ]
    monkeypatch.setattr(reservation, "reserve_request_id", real)
    monkeypatch.setattr(reservation, "reserve_request_ids", real_batch)
    for request_id in (before, after):  # reserved, and kept: another worker is refused
        assert _reserve(cp, tenant_id, request_id, "w-b") == grpc.StatusCode.ALREADY_EXISTS
    assert _reserve(cp, tenant_id, poisoned, "w-b") == grpc.StatusCode.OK  # its transaction rolled back


def test_batches_of_the_same_ids_in_opposite_orders_at_once_answer_every_entry_and_one_worker_each(
    cp, tenant_id
) -> None:
    """Two workers reserve the same ids at the same moment, in opposite orders (as their callers happened
    to come): each id goes to exactly one of them, and no call fails (a database deadlock between the two
    transactions would, were their rows not taken in one order)."""
    for _ in range(3):
        ids = [f"cross-{uuid.uuid4().hex}" for _ in range(60)]
        start = threading.Barrier(2)
        results: dict[str, list[tuple[grpc.StatusCode, str]]] = {}

        def batch(worker: str, order: list[str], start=start, results=results) -> None:
            start.wait()
            results[worker] = dict(
                zip(order, _reserve_many(cp, [(tenant_id, r, worker) for r in order]), strict=True)
            )

        threads = [
            threading.Thread(target=batch, args=("w-x", ids)),
            threading.Thread(target=batch, args=("w-y", ids[::-1])),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert set(results) == {"w-x", "w-y"}
        for request_id in ids:
            codes = sorted(results[w][request_id][0].name for w in ("w-x", "w-y"))
            assert codes == ["ALREADY_EXISTS", "OK"], request_id


def test_a_batch_that_loses_to_another_transaction_answers_each_entry_on_its_own(cp, tenant_id, monkeypatch):
    """A deadlock or serialization failure of the batch's transaction is not the entries' fault: each is
    answered in a transaction of its own."""
    from sqlalchemy.exc import OperationalError

    from control_plane.usage import reservation

    class Deadlock(Exception):
        sqlstate = "40P01"

    real, real_batch = reservation.reserve_request_id, reservation.reserve_request_ids
    victim = f"victim-{uuid.uuid4().hex}"
    calls = {"victim": 0}

    def losing_once(session, entries):  # the batch's statement, the victim among its rows
        outcomes = real_batch(session, entries)
        if any(entry[1] == victim for entry in entries):
            calls["victim"] += 1
            if calls["victim"] == 1:
                raise OperationalError("INSERT ...", {}, Deadlock("deadlock detected"))
        return outcomes

    def counting(session, tenant, request_id, worker_id, ttl_ms=0, sweep=True):
        calls["victim"] += request_id == victim
        return real(session, tenant, request_id, worker_id, ttl_ms, sweep)

    monkeypatch.setattr(reservation, "reserve_request_ids", losing_once)
    monkeypatch.setattr(reservation, "reserve_request_id", counting)
    others = [f"o{i}-{uuid.uuid4().hex}" for i in range(3)]
    outcomes = _reserve_many(cp, [(tenant_id, r, "w-a") for r in [*others, victim]])
    assert [code for code, _ in outcomes] == [grpc.StatusCode.OK] * 4
    assert calls["victim"] == 2  # in the batch, then alone
    monkeypatch.setattr(reservation, "reserve_request_id", real)
    monkeypatch.setattr(reservation, "reserve_request_ids", real_batch)
    for request_id in [*others, victim]:
        assert _reserve(cp, tenant_id, request_id, "w-b") == grpc.StatusCode.ALREADY_EXISTS


def test_an_entry_for_a_tenant_that_does_not_exist_is_refused_alone(cp, tenant_id) -> None:
    """The database refuses the row (no such tenant): that entry is INVALID_ARGUMENT naming tenant_id, and
    the others of its batch are reserved all the same."""
    ghost = str(uuid.uuid4())
    ids = [f"g{i}-{uuid.uuid4().hex}" for i in range(3)]
    outcomes = _reserve_many(
        cp, [(tenant_id, ids[0], "w-a"), (ghost, ids[1], "w-a"), (tenant_id, ids[2], "w-a")]
    )
    assert outcomes == [
        (grpc.StatusCode.OK, ""),
        (grpc.StatusCode.INVALID_ARGUMENT, "tenant_id"),
        (grpc.StatusCode.OK, ""),
    ]
    for request_id in (ids[0], ids[2]):
        assert _reserve(cp, tenant_id, request_id, "w-b") == grpc.StatusCode.ALREADY_EXISTS
