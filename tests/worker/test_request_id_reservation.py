"""Client request ids across workers: one stream at a time per (tenant, request id), reserved at the
control plane; an id whose stream delivered nothing is usable again; with the control plane's database
down, a cached key's request that carries an id is still served (counted as unchecked)."""

from __future__ import annotations

import re
import time
import uuid

import grpc
import pytest
from worker_test_support import Admin, LoopThread

from openlora.v1 import inference_pb2, inference_pb2_grpc

from .conftest import ADMIN_KEY, WORKER_TOKEN, start_worker

PROMPT = "hello world"


def _stub(target: str) -> tuple[grpc.Channel, inference_pb2_grpc.InferenceServiceStub]:
    channel = grpc.insecure_channel(target)
    return channel, inference_pb2_grpc.InferenceServiceStub(channel)


def _generate(target: str, key: str, **fields) -> list[inference_pb2.GenerateResponse]:
    channel, stub = _stub(target)
    with channel:
        return list(
            stub.Generate(
                inference_pb2.GenerateRequest(**fields),
                metadata=(("authorization", f"Bearer {key}"),),
                timeout=60,
            )
        )


def _serving(stub, key: str, request_id: str):
    """A 300-token stream under `request_id`, once its first message arrived (the worker serves it now)."""
    stream = stub.Generate(
        inference_pb2.GenerateRequest(
            prompt=PROMPT, request_id=request_id, sampling=inference_pb2.SamplingParams(max_tokens=300)
        ),
        metadata=(("authorization", f"Bearer {key}"),),
        timeout=120,
    )
    next(stream)
    return stream


def _code(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_same_request_id_on_two_workers_at_once_is_served_once(system, spare_worker):
    _, _, key = system.new_tenant()
    request_id = f"twice-{uuid.uuid4().hex}"
    channel, stub = _stub(system.target)
    with channel:
        stream = _serving(stub, key, request_id)
        other = f"127.0.0.1:{spare_worker.port}"
        refused = _code(lambda: _generate(other, key, prompt=PROMPT, request_id=request_id))
        assert refused == grpc.StatusCode.ALREADY_EXISTS
        assert list(stream)[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH


def test_request_id_whose_stream_delivered_nothing_is_served_on_another_worker(system, spare_worker):
    _, _, key = system.new_tenant()
    request_id = f"nothing-{uuid.uuid4().hex}"
    too_long = [1] * (system.worker.engine.max_model_len + 8)
    refused = _code(lambda: _generate(system.target, key, prompt_token_ids=too_long, request_id=request_id))
    assert refused == grpc.StatusCode.INVALID_ARGUMENT
    other = f"127.0.0.1:{spare_worker.port}"
    deadline = time.monotonic() + 5  # the reservation is given back beside the failed call
    while True:
        code = _code(lambda: _generate(other, key, prompt=PROMPT, request_id=request_id))
        if code != grpc.StatusCode.ALREADY_EXISTS or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert code == grpc.StatusCode.OK


@pytest.fixture
def outage(request, server_state_dir, tiny_model_dir, tmp_path):
    """A control plane over a PostgreSQL of this test's own (stopped at will), and a worker that caches
    answers for 10 s (or the milliseconds the test's parameter says)."""
    ttl_ms = getattr(request, "param", 10_000)
    from control_plane.config import ControlPlaneConfig
    from control_plane.server.server import serve
    from openlora.embedded import EmbeddedPostgres

    postgres = EmbeddedPostgres(server_state_dir)
    url = postgres.start()
    loop = LoopThread()
    cp = loop.run(
        serve(
            ControlPlaneConfig(
                database_url=url,
                state_dir=tmp_path / "cp",
                worker_token=WORKER_TOKEN,
                listen="127.0.0.1:0",
                admin_key=ADMIN_KEY,
                authorize_cache_ttl_ms=ttl_ms,
                predictor_interval_s=0,
            )
        )
    )
    worker = start_worker(
        loop, cp.target, tiny_model_dir, tmp_path / "worker", None, auth_cache_ttl_s=ttl_ms / 1000
    )
    admin = Admin(cp.target, ADMIN_KEY)
    try:
        yield postgres, worker, admin
    finally:
        admin.close()
        loop.run(worker.stop(0.5))
        loop.run(cp.stop(0.5))
        loop.close()
        postgres.stop()


def test_database_outage_still_serves_a_cached_key_with_a_request_id(outage):
    postgres, worker, admin = outage
    admin.create_tenant("during")
    _, key = admin.create_key("during")
    target = f"127.0.0.1:{worker.port}"
    assert _generate(target, key, prompt=PROMPT, sampling=inference_pb2.SamplingParams(max_tokens=2))
    postgres.stop()
    for i in range(2):
        served = _generate(
            target,
            key,
            prompt=PROMPT,
            request_id=f"outage-{i}",
            sampling=inference_pb2.SamplingParams(max_tokens=2),
        )
        assert served[-1].usage.completion_tokens == 2
    assert worker.metrics.request_id_unchecked._value.get() == 2
    # The same id twice on this worker at once is still refused by its own in-flight set, and billing
    # stays keyed by (tenant, request id) in the spool: a repeat is refused before it is served.
    assert _code(lambda: _generate(target, key, prompt=PROMPT, request_id="outage-0")) == (
        grpc.StatusCode.ALREADY_EXISTS
    )


def test_an_id_billed_before_an_outage_is_refused_during_it(outage):
    """While the control plane could not be asked, an id this worker had served and billed was served again
    in full, and not billed (the usage key kept it out of the invoice): the worker remembers the ids of
    the usage the control plane acknowledged, and refuses them itself."""
    postgres, worker, admin = outage
    admin.create_tenant("billed")
    _, key = admin.create_key("billed")
    target = f"127.0.0.1:{worker.port}"
    two = inference_pb2.SamplingParams(max_tokens=2)
    for i in range(3):
        assert _generate(target, key, prompt=PROMPT, request_id=f"billed-{i}", sampling=two)
    deadline = time.monotonic() + 20
    while worker.usage.num_pending:  # acknowledged by the control plane, no longer in the spool
        assert time.monotonic() < deadline, "the usage never reached the control plane"
        time.sleep(0.1)
    postgres.stop()
    for i in range(3):
        assert _code(
            lambda i=i: _generate(target, key, prompt=PROMPT, request_id=f"billed-{i}", sampling=two)
        ) == (grpc.StatusCode.ALREADY_EXISTS)
    # A new id is still served, unreserved.
    assert (
        _generate(target, key, prompt=PROMPT, request_id="fresh", sampling=two)[-1].usage.completion_tokens
        == 2
    )


@pytest.mark.parametrize("outage", [300], indirect=True)
def test_a_key_seen_before_an_outage_is_served_past_its_cache_ttl(outage):
    """The README's promise: while the control plane cannot answer (its database down), the worker serves
    the keys it has answers for, not only for the answer's 0.3 s TTL; a key it never saw is UNAVAILABLE."""
    postgres, worker, admin = outage
    admin.create_tenant("known")
    _, key = admin.create_key("known")
    admin.create_tenant("unknown")
    _, unseen = admin.create_key("unknown")
    target = f"127.0.0.1:{worker.port}"
    two = inference_pb2.SamplingParams(max_tokens=2)
    assert _generate(target, key, prompt=PROMPT, sampling=two)
    postgres.stop()
    time.sleep(1.0)  # past the answer's TTL
    for _ in range(2):
        assert _generate(target, key, prompt=PROMPT, sampling=two)[-1].usage.completion_tokens == 2
    assert (
        _code(lambda: _generate(target, unseen, prompt=PROMPT, sampling=two)) == grpc.StatusCode.UNAVAILABLE
    )


@pytest.mark.parametrize("outage", [300], indirect=True)
def test_during_an_outage_a_known_key_calls_the_names_it_was_answered_for_in_any_combination(
    outage, tiny_model_dir
):
    """The worker caches answers per (key, adapter names): a key seen calling only an adapter got
    UNAVAILABLE for the base model while the control plane was away, though the README says the worker
    serves the keys it knows. Each name resolves on its own, so the key's answers compose: the base model,
    each adapter, and both adapters together; a name never answered for the key stays UNAVAILABLE."""
    postgres, worker, admin = outage
    admin.create_tenant("composed")
    _, key = admin.create_key("composed")
    for name in ("ad0", "ad1", "ad2"):
        admin.push(tiny_model_dir / "adapters" / name, f"own-{name}", "composed", "tiny")
    target = f"127.0.0.1:{worker.port}"
    two = inference_pb2.SamplingParams(max_tokens=2)
    assert _generate(target, key, prompt=PROMPT, adapter="own-ad0", sampling=two)
    assert _generate(target, key, prompt=PROMPT, adapter="own-ad1", sampling=two)
    postgres.stop()
    time.sleep(1.0)  # past the answers' TTL
    mix = [inference_pb2.AdapterWeight(adapter=f"own-ad{i}", weight=0.5) for i in (0, 1)]
    for fields in ({}, {"adapter": "own-ad1"}, {"mix": mix}):
        served = _generate(target, key, prompt=PROMPT, sampling=two, **fields)
        assert served[-1].usage.completion_tokens == 2, fields
    never_asked = _code(lambda: _generate(target, key, prompt=PROMPT, adapter="own-ad2", sampling=two))
    assert never_asked == grpc.StatusCode.UNAVAILABLE


def test_a_spool_that_cannot_be_written_bills_nothing_and_the_id_is_served_again(system, monkeypatch):
    """Disk full under the usage spool: the first chunk's checkpoint fails before the chunk is handed
    over, so the caller gets UNAVAILABLE and nothing; nothing may be billed for it (it was: one token and
    the prompt), and its request id must be served once the disk has room (it was refused as billed)."""
    import errno

    tenant, _, key = system.new_tenant()
    reporter = system.worker.usage
    real_append = reporter._append

    def full(records):
        raise OSError(errno.ENOSPC, "No space left on device")

    request_id = f"full-{uuid.uuid4().hex[:8]}"
    monkeypatch.setattr(reporter, "_append", full)
    assert (
        _code(lambda: _generate(system.target, key, prompt=PROMPT, request_id=request_id))
        == grpc.StatusCode.UNAVAILABLE
    )
    monkeypatch.setattr(reporter, "_append", real_append)
    served = _generate(system.target, key, prompt=PROMPT, request_id=request_id)
    delivered = sum(len(r.token_ids) for r in served)
    assert delivered > 0
    usage = system.wait_usage(tenant, 1)
    assert (usage.total_requests, usage.total_completion_tokens) == (1, delivered)


def test_a_stream_delivered_whole_ends_ok_when_its_final_usage_record_cannot_be_spooled(system, monkeypatch):
    """Disk full as a stream ends: every chunk was handed over, so the call ends OK (it ended UNAVAILABLE,
    "retry shortly", after the whole answer: a client retrying it ran and paid for it twice). The final
    record stays pending in memory and is billed once, exactly what was delivered."""
    import errno

    tenant, _, key = system.new_tenant()
    reporter = system.worker.usage
    real_record = reporter.record

    def full(records):
        raise OSError(errno.ENOSPC, "No space left on device")

    def record_on_a_full_disk(record):
        reporter._append = full  # this record's spool write fails; checkpoints before it were written
        try:
            real_record(record)
        finally:
            del reporter._append

    monkeypatch.setattr(reporter, "record", record_on_a_full_disk)
    served = _generate(system.target, key, prompt=PROMPT)  # raises on any status but OK
    monkeypatch.undo()
    delivered = sum(len(r.token_ids) for r in served)
    assert delivered > 0 and served[-1].usage.completion_tokens == delivered
    usage = system.wait_usage(tenant, 1)
    assert (usage.total_requests, usage.total_completion_tokens) == (1, delivered)


def test_a_worker_whose_spool_cannot_be_written_is_not_serving_until_it_can(system, monkeypatch):
    """Disk full under the usage spool: the worker could not bill a call, so its health turns NOT_SERVING
    (a router must stop sending it traffic), new calls are refused UNAVAILABLE at once, naming the spool,
    before any prefill; once a write succeeds again it is SERVING and bills as before."""
    import errno

    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from worker_test_support import wait_health

    tenant, _, key = system.new_tenant()
    reporter = system.worker.usage

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(reporter, "_write", full)
    monkeypatch.setattr(reporter, "_write_probe", full)
    try:
        assert _code(lambda: _generate(system.target, key, prompt=PROMPT)) == grpc.StatusCode.UNAVAILABLE
        wait_health(system.target, want_serving=False, timeout_s=30)
        channel, stub = _stub(system.target)
        with channel, pytest.raises(grpc.RpcError) as refused:
            list(
                stub.Generate(
                    inference_pb2.GenerateRequest(prompt=PROMPT),
                    metadata=(("authorization", f"Bearer {key}"),),
                    timeout=60,
                )
            )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "usage" in refused.value.details() and "No space left" in refused.value.details()
    finally:
        monkeypatch.undo()
    wait_health(system.target, want_serving=True, timeout_s=30)
    channel = grpc.insecure_channel(system.target)
    with channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    served = _generate(system.target, key, prompt=PROMPT)
    delivered = sum(len(r.token_ids) for r in served)
    usage = system.wait_usage(tenant, 1)
    assert (usage.total_requests, usage.total_completion_tokens) == (1, delivered)


def test_a_restarted_worker_frees_the_ids_its_dead_streams_held(system, tmp_path):
    """Killed before its stream delivered anything, a worker held the stream's id until the reservation
    lapsed: the client's retry on another worker got ALREADY_EXISTS. The worker restarted under its id
    gives such reservations back before it serves."""
    from data_plane.server.control_plane_client import ControlPlaneError

    tenant, _, _ = system.new_tenant()
    tenant_id = system.tenant_ids[tenant]
    worker_id = f"restarted-{uuid.uuid4().hex[:8]}"
    request_id = f"died-{uuid.uuid4().hex}"
    client = system.worker.control_plane  # on the system's loop

    async def reserve(as_worker: str) -> grpc.StatusCode:
        try:
            await client.reserve_request_id(tenant_id, request_id, as_worker, 600_000)
        except ControlPlaneError as error:
            return error.code
        return grpc.StatusCode.OK

    # the previous run's stream, reserved for ten minutes, then the process died
    assert system.loop.run(reserve(worker_id)) == grpc.StatusCode.OK
    assert system.loop.run(reserve("another-worker")) == grpc.StatusCode.ALREADY_EXISTS
    worker = start_worker(
        system.loop, system.control_plane.target, system.model_dir, tmp_path, None, worker_id=worker_id
    )
    try:
        assert system.loop.run(reserve("another-worker")) == grpc.StatusCode.OK
    finally:
        system.loop.run(worker.stop(1.0))


def test_a_worker_paused_past_its_reservation_ends_a_stream_whose_id_another_worker_then_served(
    system, spare_worker, tmp_path
):
    """A worker paused mid-stream (SIGSTOP, a stall of its event loop) for longer than its request id's
    reservation: the client's retry on another worker is served, as for a worker that died. When the first
    worker runs again its stream must end (ALREADY_EXISTS) before it hands over another chunk: it went on
    to deliver a whole second answer under the id, billed once. What it delivered before the pause is
    billed beside the retry's answer (it was merged into it, by rank, and went unbilled)."""
    paused = LoopThread()
    worker = start_worker(
        paused,
        system.control_plane.target,
        system.model_dir,
        tmp_path / "w",
        None,
        request_id_reservation_s=1.0,
    )
    try:
        tenant, _, key = system.new_tenant()
        request_id = f"paused-{uuid.uuid4().hex}"
        channel, stub = _stub(f"127.0.0.1:{worker.port}")
        with channel:
            stream = stub.Generate(
                inference_pb2.GenerateRequest(
                    prompt=PROMPT,
                    request_id=request_id,
                    sampling=inference_pb2.SamplingParams(max_tokens=400),
                ),
                metadata=(("authorization", f"Bearer {key}"),),
                timeout=120,
            )
            received = len(next(stream).token_ids)
            paused.loop.call_soon_threadsafe(time.sleep, 3.0)  # the worker stops, as under SIGSTOP
            time.sleep(1.8)  # its reservation lapses
            retried = _generate(f"127.0.0.1:{spare_worker.port}", key, prompt=PROMPT, request_id=request_id)
            assert retried[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
            with pytest.raises(grpc.RpcError) as ended:
                for response in stream:
                    received += len(response.token_ids)
        assert ended.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert received < 400
        # Two answers were delivered: each is billed what it delivered, the paused one as a request of its own.
        usage = system.wait_usage(tenant, 2)
        retried_tokens = sum(len(r.token_ids) for r in retried)
        assert (usage.total_requests, usage.total_completion_tokens) == (2, received + retried_tokens)
    finally:
        paused.run(worker.stop(0.5))
        paused.close()


def test_a_worker_started_under_a_live_workers_id_is_refused_and_frees_none_of_its_ids(system, make_worker):
    """Two processes under one worker id (--worker-id given twice, a state dir copied): the second's start
    gave back the first's reservations, and a reservation renewed for 'the same worker' let both serve
    one request id at once, the second serving merged into the first's usage and never billed. The
    second is refused (ALREADY_EXISTS naming worker_id); the first's own restart takes the id at once."""
    from data_plane.server.control_plane_client import ControlPlaneError

    worker_id = f"twin-{uuid.uuid4().hex[:8]}"
    first = make_worker(worker_id=worker_id)
    tenant, _, key = system.new_tenant()
    request_id = f"twin-{uuid.uuid4().hex}"
    channel, stub = _stub(f"127.0.0.1:{first.port}")
    with channel:
        stream = _serving(stub, key, request_id)
        with pytest.raises(ControlPlaneError) as refused:
            make_worker(worker_id=worker_id)
        assert refused.value.code == grpc.StatusCode.ALREADY_EXISTS and "worker_id" in refused.value.message
        assert _code(lambda: _generate(system.target, key, prompt=PROMPT, request_id=request_id)) == (
            grpc.StatusCode.ALREADY_EXISTS
        )
        assert list(stream)[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
    system.loop.run(first.usage.flush())
    assert system.wait_usage(tenant, 1).total_requests == 1
    # Its own next run, from its state dir, while its row still looks live.
    system.loop.run(first.stop(1.0))
    restarted = start_worker(
        system.loop,
        system.control_plane.target,
        system.model_dir,
        first.config.state_dir,
        None,
        worker_id=worker_id,
    )
    try:
        assert restarted.worker_id == worker_id
    finally:
        system.loop.run(restarted.stop(1.0))


def test_a_copy_of_a_serving_workers_state_dir_is_refused_its_id(system, make_worker, tmp_path):
    """A copy taken while the worker served named that live run as its own previous one, so the control
    plane handed it the id: two processes served under one id (shared request-id reservations, merged usage).
    A run at another path (or host) names no previous run."""
    import shutil

    from data_plane.server.control_plane_client import ControlPlaneError

    first = make_worker()
    copy = tmp_path / "copied-state"
    shutil.copytree(first.config.state_dir, copy, ignore=shutil.ignore_patterns("*.lock"))
    with pytest.raises(ControlPlaneError) as refused:
        start_worker(system.loop, system.control_plane.target, system.model_dir, copy, None)
    assert refused.value.code == grpc.StatusCode.ALREADY_EXISTS and "worker_id" in refused.value.message
    assert _code(lambda: _generate(f"127.0.0.1:{first.port}", system.new_tenant()[2], prompt=PROMPT)) == (
        grpc.StatusCode.OK
    )


@pytest.mark.parametrize(
    "damaged",
    [
        pytest.param(b"\x00" * 120, id="zero-filled"),  # a power loss after the size was written
        pytest.param(
            b'{"instance": "' + b"0" * 32 + b'", "host": "a-host-name-that-is-long", "st', id="cut-short"
        ),
        pytest.param(b"\xff\xfe" + b"1" * 30, id="not-utf-8"),
    ],
)
def test_a_worker_whose_instance_file_is_damaged_starts_and_rewrites_it(system, tmp_path, damaged):
    """The state dir's record of its last run, damaged (cut short by a crash while it was written, zeroed
    by a power loss): it names no previous run. It was sent as one (INVALID_ARGUMENT naming
    previous_instance_id: NUL characters, or past 64 characters) or failed to decode, and the worker
    could never start again until someone deleted the file."""
    from data_plane.server.main import _previous_instance

    state_dir = tmp_path / "damaged"
    state_dir.mkdir()
    (state_dir / "worker_instance").write_bytes(damaged)
    worker = start_worker(system.loop, system.control_plane.target, system.model_dir, state_dir, None)
    try:
        assert _previous_instance(state_dir / "worker_instance") != ""  # rewritten whole, for its next run
    finally:
        system.loop.run(worker.stop(1.0))


@pytest.mark.parametrize(
    "damaged",
    [
        pytest.param(b"\x00" * 32, id="zero-filled"),
        pytest.param(b"\xff\xfe" + b"1" * 30, id="not-utf-8"),
        pytest.param(b"0123\x01\x02" + b"7" * 26, id="control-characters"),
    ],
)
def test_a_worker_whose_id_file_is_damaged_registers_as_a_new_worker(system, tmp_path, damaged):
    """The state dir's worker id, damaged by a power loss: the worker registers as a new one and writes
    its new id whole. Sent as it stood, a zeroed file was refused at every start (INVALID_ARGUMENT naming
    worker_id), and bytes that are not UTF-8 stopped the start with a traceback."""
    state_dir = tmp_path / "damaged"
    state_dir.mkdir()
    (state_dir / "worker_id").write_bytes(damaged)
    worker = start_worker(system.loop, system.control_plane.target, system.model_dir, state_dir, None)
    try:
        assert re.fullmatch(r"[0-9a-f]{32}", worker.worker_id)
        assert (state_dir / "worker_id").read_text() == worker.worker_id
    finally:
        system.loop.run(worker.stop(1.0))
    restarted = start_worker(system.loop, system.control_plane.target, system.model_dir, state_dir, None)
    try:
        assert restarted.worker_id == worker.worker_id  # the id written is the one read next time
    finally:
        system.loop.run(restarted.stop(1.0))


def test_a_worker_id_an_operator_wrote_in_the_state_dir_is_kept(system, tmp_path):
    state_dir = tmp_path / "named"
    state_dir.mkdir()
    (state_dir / "worker_id").write_text(f"gpu-{uuid.uuid4().hex[:6]}\n")
    named = (state_dir / "worker_id").read_text().strip()
    worker = start_worker(system.loop, system.control_plane.target, system.model_dir, state_dir, None)
    try:
        assert worker.worker_id == named
    finally:
        system.loop.run(worker.stop(1.0))
