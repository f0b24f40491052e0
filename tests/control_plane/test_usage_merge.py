"""Checkpoints and the final record of one request merge idempotently: the largest count is billed once,
never a sum, whatever the order, batching or resending; counters and invoices move by exactly the delta.

Each test bills one tenant ("merged") with checkpoints and finals and a second one ("reference") with the
finals alone, and compares what the control plane stored for the two, down to the micro-token."""

from __future__ import annotations

import random
import threading
import uuid
from datetime import UTC, datetime, timedelta

import grpc
import psycopg
import pytest

from openlora.v1 import worker_pb2

from .conftest import write_peft_adapter

BASE = "tiny-llama"
CHECKPOINT = "interrupted"
JUNE = datetime(2026, 6, 3, 10, 20, tzinfo=UTC)


@pytest.fixture(scope="module")
def adapters(cp, tmp_path_factory) -> list[str]:
    """Three public adapters: mixed requests over them split with tied remainders."""
    root = tmp_path_factory.mktemp("mix")
    with cp.admin() as admin:
        admin.create_tenant("publisher")
        key = admin.create_api_key("publisher", admin=True).secret
        admin.set_price(
            BASE, prompt_micros_per_million_tokens=100_000, completion_micros_per_million_tokens=300_000
        )
    with cp.admin(key) as publisher:
        return [
            publisher.upload_adapter(
                write_peft_adapter(root / f"mix{i}", seed=40 + i, rank=4, targets=["q_proj"]),
                name=f"mix{i}",
                base_model=BASE,
                public=True,
                royalty_micros_per_million_tokens=1_000_000,
            ).adapter.id
            for i in range(3)
        ]


# tenant id -> name, of the tenants made here
_NAMES: dict[str, str] = {}


@pytest.fixture
def pair(cp) -> tuple[str, str]:
    """(merged, reference): two fresh tenants' ids."""
    ids = []
    with cp.admin() as admin:
        for _ in range(2):
            tenant = admin.create_tenant(f"t{uuid.uuid4().hex[:10]}")
            _NAMES[tenant.id] = tenant.name
            ids.append(tenant.id)
    return ids[0], ids[1]


def _event(
    request_id: str,
    tenant_id: str,
    completion: int,
    when: datetime,
    *,
    final: bool = True,
    adapters: list[tuple[str, float]] = (),
    prompt: int = 7,
    worker: str = "w1",
) -> worker_pb2.UsageEvent:
    event = worker_pb2.UsageEvent(
        request_id=request_id,
        tenant_id=tenant_id,
        adapters=[worker_pb2.UsageAdapter(adapter_id=a, weight=w) for a, w in adapters],
        worker_id=worker,
        base_model=BASE,
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_ms=10.0,
        finish_reason="length" if final else CHECKPOINT,
    )
    event.finished_at.FromDatetime(when)
    return event


def _report(cp, events) -> worker_pb2.ReportUsageResponse:
    return cp.worker_stub().ReportUsage(
        worker_pb2.ReportUsageRequest(events=events), metadata=cp.worker_metadata()
    )


def _stored(cp, tenant_id: str) -> dict:
    """Everything billing reads for a tenant: its events, adapter links and hourly counters."""
    with psycopg.connect(cp.config.database_url) as conn:
        events = conn.execute(
            "SELECT request_id, prompt_tokens, completion_tokens FROM usage_event WHERE tenant_id = %s",
            (tenant_id,),
        ).fetchall()
        links = conn.execute(
            "SELECT request_id, adapter_id::text, weight FROM usage_event_adapter WHERE tenant_id = %s",
            (tenant_id,),
        ).fetchall()
        counters = conn.execute(
            "SELECT base_model, adapter_id::text, hour_at, requests, prompt_micro_tokens, "
            "completion_micro_tokens FROM usage_counter WHERE tenant_id = %s",
            (tenant_id,),
        ).fetchall()
    return {"events": sorted(events), "links": sorted(links), "counters": sorted(counters, key=str)}


def _invoice(cp, tenant_id: str, period: str) -> list[tuple]:
    with cp.admin() as admin:
        invoice = admin.get_invoice(period, tenant=_NAMES[tenant_id])
    lines = [(line.kind, line.adapter, line.completion_tokens, line.amount_micros) for line in invoice.lines]
    return [*lines, ("net", invoice.net_micros)]


def test_checkpoint_then_final_bills_the_final_once(cp, adapters, pair) -> None:
    merged, reference = pair
    mix = [(adapters[0], 0.25), (adapters[1], 0.75)]
    for completion in (40, 90, 130):
        assert (
            _report(cp, [_event("r1", merged, completion, JUNE, final=False, adapters=mix)]).duplicates == 0
        )
    assert _report(cp, [_event("r1", merged, 150, JUNE, adapters=mix)]) == worker_pb2.ReportUsageResponse()
    _report(cp, [_event("r1", reference, 150, JUNE, adapters=mix)])

    stored = _stored(cp, merged)
    assert stored["events"] == [("r1", 7, 150)]
    assert [c[3] for c in stored["counters"]] == [1, 1]  # one request on each adapter line, not four
    assert stored == _stored(cp, reference)
    assert _invoice(cp, merged, "2026-06") == _invoice(cp, reference, "2026-06")


def test_a_checkpoint_after_its_final_changes_nothing(cp, pair) -> None:
    merged, _ = pair
    assert _report(cp, [_event("r1", merged, 150, JUNE)]).inserted == 1
    late = _event("r1", merged, 120, JUNE, final=False)
    assert _report(cp, [late]) == worker_pb2.ReportUsageResponse(inserted=0, duplicates=1)
    # A checkpoint with the final's own count ranks below it too.
    assert _report(cp, [_event("r1", merged, 150, JUNE, final=False)]).duplicates == 1
    assert _stored(cp, merged)["events"] == [("r1", 7, 150)]
    with psycopg.connect(cp.config.database_url) as conn:
        reason = conn.execute(
            "SELECT finish_reason FROM usage_event WHERE tenant_id = %s", (merged,)
        ).fetchone()
    assert reason == ("length",)


def test_a_request_known_only_by_checkpoints_bills_the_largest(cp, pair) -> None:
    merged, reference = pair
    _report(cp, [_event("r1", merged, c, JUNE, final=False) for c in (30, 80, 55)])
    _report(cp, [_event("r1", merged, 80, JUNE, final=False)])
    _report(cp, [_event("r1", reference, 80, JUNE, final=False)])
    assert _stored(cp, merged)["events"] == [("r1", 7, 80)]
    assert _stored(cp, merged) == _stored(cp, reference)


def test_any_order_batching_and_resending_bills_each_request_once(cp, adapters, pair) -> None:
    merged, reference = pair
    rng = random.Random(7)
    records, finals = [], []
    for i in range(12):
        adapters_of = [(a, 1.0) for a in rng.sample(adapters, rng.randint(0, 3))]
        counts = sorted(rng.sample(range(1, 400), 4))
        start = JUNE + timedelta(minutes=7 * i)
        for j, count in enumerate(counts[:-1]):
            when = start + timedelta(seconds=j)
            records.append(_event(f"q{i}", merged, count, when, final=False, adapters=adapters_of))
        final_at = start + timedelta(seconds=30)
        records.append(_event(f"q{i}", merged, counts[-1], final_at, adapters=adapters_of))
        finals.append(_event(f"q{i}", reference, counts[-1], final_at, adapters=adapters_of))
    records += rng.sample(records, 10)  # resent after a lost acknowledgement
    rng.shuffle(records)
    while records:  # batches of random sizes; one key may appear several times in one batch
        size = rng.randint(1, 9)
        batch, records = records[:size], records[size:]
        _report(cp, batch)
        if rng.random() < 0.3:
            _report(cp, batch)  # the same batch again
    _report(cp, finals)

    stored = _stored(cp, merged)
    assert len(stored["events"]) == 12
    assert stored == _stored(cp, reference)
    assert _invoice(cp, merged, "2026-06") == _invoice(cp, reference, "2026-06")


def test_a_final_in_a_later_hour_moves_the_request_out_of_the_checkpoints_hour(cp, adapters, pair) -> None:
    merged, reference = pair
    before = datetime(2026, 6, 30, 23, 59, 50, tzinfo=UTC)  # another hour, day and month
    after = datetime(2026, 7, 1, 0, 0, 20, tzinfo=UTC)
    mix = [(adapters[2], 1.0)]
    _report(cp, [_event("r1", merged, 60, before, final=False, adapters=mix)])
    _report(cp, [_event("r1", merged, 75, after, adapters=mix)])
    _report(cp, [_event("r1", reference, 75, after, adapters=mix)])
    stored = _stored(cp, merged)
    assert [(c[2], c[3]) for c in stored["counters"]] == [(datetime(2026, 7, 1, tzinfo=UTC), 1)]
    assert stored == _stored(cp, reference)
    assert _invoice(cp, merged, "2026-06") == [("net", 0)]
    assert _invoice(cp, merged, "2026-07") == _invoice(cp, reference, "2026-07")


def test_adapter_order_of_the_report_does_not_change_the_split(cp, adapters, pair) -> None:
    merged, reference = pair
    # Ten tokens over three equal weights leave remainders that tie: the same adapter gets the spare
    # micro-token whichever order a report lists them in, so replacing a checkpoint takes out exactly
    # what it added.
    forward = [(a, 1.0) for a in adapters]
    _report(cp, [_event("r1", merged, 10, JUNE, final=False, adapters=forward)])
    _report(cp, [_event("r1", merged, 20, JUNE, adapters=forward[::-1])])
    _report(cp, [_event("r1", reference, 20, JUNE, adapters=forward[1:] + forward[:1])])
    stored = _stored(cp, merged)
    assert sum(c[5] for c in stored["counters"]) == 20_000_000
    assert stored == _stored(cp, reference)


def test_concurrent_checkpoints_and_finals_of_the_same_requests_bill_each_once(cp, pair) -> None:
    merged, reference = pair
    finals = [_event(f"c{i}", merged, 100 + i, JUNE) for i in range(15)]
    checkpoints = [_event(f"c{i}", merged, 50 + i, JUNE, final=False) for i in range(15)]
    barrier = threading.Barrier(6)
    errors: list[BaseException] = []

    def report(seed: int) -> None:
        batch = (finals if seed % 2 else checkpoints)[:]
        random.Random(seed).shuffle(batch)
        barrier.wait()
        try:
            _report(cp, batch)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=report, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    _report(cp, [_event(f"c{i}", reference, 100 + i, JUNE) for i in range(15)])
    assert _stored(cp, merged) == _stored(cp, reference)


def test_a_request_id_with_a_checkpoint_only_is_already_used(cp, pair) -> None:
    merged, _ = pair
    _report(cp, [_event("cut", merged, 12, JUNE, final=False)])
    with pytest.raises(grpc.RpcError) as e:
        cp.worker_stub().CheckRequestId(
            worker_pb2.CheckRequestIdRequest(tenant_id=merged, request_id="cut"),
            metadata=cp.worker_metadata(),
        )
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_records_of_one_request_id_from_two_workers_bill_each_serving_once(cp, adapters, pair) -> None:
    """Worker w1 streamed 40 tokens under "r1" and was paused (or killed) past the id's reservation; the
    client's retry under "r1" was served by w2 (150 tokens). w1's records then arrive: they are another
    serving, billed as a request of its own (merged by rank with w1's other records), never folded into
    w2's by rank (w1's 40 delivered tokens unbilled)."""
    merged, reference = pair
    mix = [(adapters[0], 0.5), (adapters[1], 0.5)]
    assert _report(cp, [_event("r1", merged, 150, JUNE, adapters=mix, worker="w2")]).inserted == 1
    assert _report(cp, [_event("r1", merged, 30, JUNE, final=False, adapters=mix)]).inserted == 1
    assert _report(cp, [_event("r1", merged, 40, JUNE, adapters=mix)]) == worker_pb2.ReportUsageResponse()
    for late in (
        _event("r1", merged, 40, JUNE, adapters=mix),
        _event("r1", merged, 150, JUNE, adapters=mix, worker="w2"),
    ):
        assert _report(cp, [late]) == worker_pb2.ReportUsageResponse(duplicates=1)
    _report(
        cp,
        [_event("r1", reference, 150, JUNE, adapters=mix), _event("r2", reference, 40, JUNE, adapters=mix)],
    )

    events = _stored(cp, merged)["events"]
    assert sorted(completion for _, _, completion in events) == [40, 150]
    assert ("r1", 7, 150) in events
    assert _stored(cp, merged)["counters"] == _stored(cp, reference)["counters"]
    assert _invoice(cp, merged, "2026-06") == _invoice(cp, reference, "2026-06")
    with pytest.raises(grpc.RpcError) as e:  # the id stays used
        cp.worker_stub().CheckRequestId(
            worker_pb2.CheckRequestIdRequest(tenant_id=merged, request_id="r1"), metadata=cp.worker_metadata()
        )
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
