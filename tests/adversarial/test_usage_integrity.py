"""Promise: no usage event dropped or counted twice: request ids are scoped to their tenant, a request id
in flight cannot be run twice at once, and a corrupt spool does not stop the rest being sent."""

from __future__ import annotations

import asyncio
import threading
import uuid

import grpc

from data_plane.server.usage_reporter import UsageRecord, UsageReporter
from openlora.v1 import inference_pb2, worker_pb2

from .conftest import ADMIN_KEY, BASE_MODEL, WORKER_TOKEN, bearer, status_of


def _usage(attacker, tenant: str):
    from openlora.v1 import admin_pb2

    return attacker.admin.GetUsage(admin_pb2.GetUsageRequest(tenant=tenant), metadata=bearer(ADMIN_KEY))


def _tenant_id(attacker, key: str) -> str:
    request = worker_pb2.AuthorizeRequest(api_key=key, base_model=BASE_MODEL)
    return attacker.workers.Authorize(request, metadata=bearer(WORKER_TOKEN)).tenant_id


def test_another_tenants_request_id_does_not_suppress_billing_at_the_control_plane(attacker):
    a, b = attacker.new_tenant(), attacker.new_tenant()
    shared = f"req-{uuid.uuid4().hex}"

    def report(tenant_id: str) -> worker_pb2.ReportUsageResponse:
        event = worker_pb2.UsageEvent(
            request_id=shared,
            tenant_id=tenant_id,
            base_model=BASE_MODEL,
            prompt_tokens=3,
            completion_tokens=4,
        )
        return attacker.workers.ReportUsage(
            worker_pb2.ReportUsageRequest(events=[event]), metadata=bearer(WORKER_TOKEN)
        )

    # B sends A's request id first: A's own event must still count, and each stays counted once.
    assert report(_tenant_id(attacker, b.infer_key)).inserted == 1
    assert report(_tenant_id(attacker, a.infer_key)).inserted == 1
    assert report(_tenant_id(attacker, a.infer_key)).duplicates == 1
    for tenant in (a, b):
        usage = _usage(attacker, tenant.name)
        assert (usage.total_requests, usage.total_completion_tokens) == (1, 4)


def test_reports_of_one_request_never_lower_or_add_to_its_bill(attacker):
    a = attacker.new_tenant()
    tenant_id = _tenant_id(attacker, a.infer_key)
    request_id = f"req-{uuid.uuid4().hex}"

    def report(completion_tokens: int, finish_reason: str) -> None:
        event = worker_pb2.UsageEvent(
            request_id=request_id,
            tenant_id=tenant_id,
            base_model=BASE_MODEL,
            prompt_tokens=3,
            completion_tokens=completion_tokens,
            finish_reason=finish_reason,
        )
        attacker.workers.ReportUsage(
            worker_pb2.ReportUsageRequest(events=[event]), metadata=bearer(WORKER_TOKEN)
        )

    # A stream's checkpoints, its final, then stale copies of each resent in any order: the largest stands.
    for completion_tokens, finish_reason in [
        (10, "interrupted"),
        (25, "interrupted"),
        (30, "length"),
        (10, "interrupted"),
        (30, "length"),
        (5, "length"),
        (25, "interrupted"),
    ]:
        report(completion_tokens, finish_reason)
    usage = _usage(attacker, a.name)
    assert (usage.total_requests, usage.total_completion_tokens) == (1, 30)
    assert [(row.requests, row.completion_tokens) for row in usage.rows] == [(1, 30)]


def test_two_tenants_with_one_request_id_are_both_billed_through_the_worker(attacker, system):
    a, b = attacker.new_tenant(), attacker.new_tenant()
    shared = f"req-{uuid.uuid4().hex}"
    for tenant in (a, b):
        final = attacker.generate(tenant.infer_key, adapter="ad0", request_id=shared)[-1]
        assert final.usage.completion_tokens == 2
    system.flush_usage()
    for tenant in (a, b):
        usage = system.wait_usage(tenant.name, 1)
        assert (usage.total_requests, usage.total_completion_tokens) == (1, 2)


def test_same_request_id_twice_at_once_is_refused_and_billed_once(attacker, system):
    a = attacker.new_tenant()
    request_id = f"req-{uuid.uuid4().hex}"
    first = attacker.inference.Generate(
        inference_pb2.GenerateRequest(
            prompt="hello world", request_id=request_id, sampling=inference_pb2.SamplingParams(max_tokens=200)
        ),
        metadata=bearer(a.infer_key),
        timeout=60,
    )
    next(first)  # the first call is streaming now
    try:
        attacker.generate(a.infer_key, request_id=request_id)
        second = grpc.StatusCode.OK
    except grpc.RpcError as error:
        second = error.code()
        assert "request_id" in error.details()
    received = sum(1 for _ in first)
    assert second == grpc.StatusCode.ALREADY_EXISTS
    assert received > 0
    # Once the first finished billed, its id stays used: served again it would be free.
    assert status_of(lambda: attacker.generate(a.infer_key, request_id=request_id)) == (
        grpc.StatusCode.ALREADY_EXISTS
    )
    # Another tenant's use of the same id is its own request.
    b = attacker.new_tenant()
    attacker.generate(b.infer_key, request_id=request_id)
    system.flush_usage()
    usage = system.wait_usage(a.name, 1)
    assert usage.total_requests == 1


def test_concurrent_duplicates_from_many_threads_run_once(attacker, system):
    a = attacker.new_tenant()
    request_id = f"req-{uuid.uuid4().hex}"
    codes: list[grpc.StatusCode] = []
    lock = threading.Lock()

    def call() -> None:
        try:
            attacker.generate(
                a.infer_key, request_id=request_id, sampling=inference_pb2.SamplingParams(max_tokens=16)
            )
            code = grpc.StatusCode.OK
        except grpc.RpcError as error:
            code = error.code()
        with lock:
            codes.append(code)

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.ALREADY_EXISTS}
    assert codes.count(grpc.StatusCode.OK) >= 1
    system.flush_usage()
    assert system.wait_usage(a.name, 1).total_requests == 1


def _refusal(attacker, key: str, request_id: str) -> grpc.RpcError | None:
    try:
        attacker.generate(key, request_id=request_id)
    except grpc.RpcError as error:
        return error
    return None


def test_reusing_a_finished_request_id_is_already_exists_and_billed_once(attacker, system):
    a = attacker.new_tenant()
    request_id = f"req-{uuid.uuid4().hex}"
    final = attacker.generate(a.infer_key, adapter="ad0", request_id=request_id)[-1]
    assert final.usage.completion_tokens == 2
    # Whether its usage is still in the worker's spool or already at the control plane: refused.
    for _ in range(2):
        refused = _refusal(attacker, a.infer_key, request_id)
        assert refused is not None and refused.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "request_id" in refused.details()
        system.flush_usage()
    usage = system.wait_usage(a.name, 1)
    assert (usage.total_requests, usage.total_completion_tokens) == (1, 2)


def test_request_id_whose_usage_is_only_in_the_worker_spool_is_refused(attacker, system):
    a = attacker.new_tenant()
    tenant_id = _tenant_id(attacker, a.infer_key)
    request_id = f"req-{uuid.uuid4().hex}"

    # A call this worker served and billed, not yet acknowledged by the control plane.
    async def spool() -> None:  # on the worker's own loop, as the servicer records
        system.worker.usage.record(_record(request_id, tenant_id, base_model=BASE_MODEL, worker_id=""))

    system.loop.run(spool())
    refused = _refusal(attacker, a.infer_key, request_id)
    assert refused is not None and refused.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "request_id" in refused.details()
    system.flush_usage()
    assert system.wait_usage(a.name, 1).total_requests == 1


def test_requests_without_a_client_id_are_each_served_and_billed(attacker, system):
    a = attacker.new_tenant()
    for _ in range(3):
        final = attacker.generate(a.infer_key)[-1]
        assert final.usage.completion_tokens == 2
    system.flush_usage()
    usage = system.wait_usage(a.name, 3)
    assert (usage.total_requests, usage.total_completion_tokens) == (3, 6)


def _record(
    request_id: str, tenant_id: str = "t1", base_model: str = "m", worker_id: str = "w"
) -> UsageRecord:
    return UsageRecord(
        request_id=request_id,
        tenant_id=tenant_id,
        adapters=(),
        worker_id=worker_id,
        base_model=base_model,
        prompt_tokens=1,
        completion_tokens=1,
        queue_ms=0.0,
        ttft_ms=0.0,
        total_ms=0.0,
        finished_at=1_700_000_000.0,
        finish_reason="stop",
    )


def _send_all(spool, before: list[UsageRecord] = ()) -> list[tuple[str, str]]:
    sent: list[tuple[str, str]] = []

    async def collect(records):
        sent.extend((r.tenant_id, r.request_id) for r in records)

    async def scenario():
        reporter = UsageReporter(spool, collect)
        for record in before:
            reporter.record(record)
        await reporter.flush()
        await reporter.stop()

    asyncio.run(scenario())
    return sent


def test_spool_with_a_torn_binary_last_line_still_sends_the_rest(tmp_path):
    spool = tmp_path / "usage.jsonl"
    torn = _record("r3").to_json().encode()[:25] + b"\xe2\x82"  # cut inside a multi-byte character
    spool.write_bytes((_record("r1").to_json() + "\n" + _record("r2").to_json() + "\n").encode() + torn)
    assert _send_all(spool, [_record("r4")]) == [("t1", "r1"), ("t1", "r2"), ("t1", "r4")]
    assert _send_all(spool) == []


def test_spool_with_garbage_lines_sends_every_readable_record(tmp_path):
    spool = tmp_path / "usage.jsonl"
    lines = [
        _record("r1").to_json().encode(),
        b"\x00" * 40,  # a tail of zeros, as a filesystem may leave after a crash
        b'{"request_id": {"not": "a string"}}',
        b"[1, 2, 3]",
        _record("r2").to_json().replace('"request_id":"r2"', '"request_id":["r2"]').encode(),
        _record("r3").to_json().encode(),
    ]
    spool.write_bytes(b"\n".join(lines) + b"\n")
    assert _send_all(spool) == [("t1", "r1"), ("t1", "r3")]


def test_spool_keeps_one_request_id_of_two_tenants_apart(tmp_path):
    spool = tmp_path / "usage.jsonl"
    sent = _send_all(spool, [_record("same", "tenant-a"), _record("same", "tenant-b")])
    assert sorted(sent) == [("tenant-a", "same"), ("tenant-b", "same")]
