"""A stream whose consumer lags: several tokens in one chunk, the first token alone, the same output as a
consumer that keeps up, and billing exact when the caller cancels after such a chunk. The request id
reservation overlaps the call's preparation without giving up its guarantees.

The consumer here is `GenerationService.generate` itself (what the gRPC servicer and the HTTP app iterate),
built on the worker's own engine, control plane client and usage reporter, so the test decides when the
consumer lags instead of guessing what HTTP/2 buffers absorbed."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import uuid

import grpc
import pytest

from data_plane.server.control_plane_client import ControlPlaneError
from data_plane.server.errors import RequestIdUsed
from data_plane.server.validation import RequestFieldError, check_request, requested_adapter_names
from openlora.client import Client
from openlora.v1 import inference_pb2

PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def service(system, tmp_path_factory):
    """A GenerationService over the system worker's engine, control plane client, usage and metrics."""
    from data_plane.server.artifact_store import ArtifactStore
    from data_plane.server.generation import GenerationService
    from data_plane.server.validation import RequestLimits

    worker = system.worker
    engine = worker.engine
    spec = dataclasses.replace(engine.spec, name=worker.config.base_model_name)
    artifacts = ArtifactStore(
        tmp_path_factory.mktemp("artifacts"),
        worker.control_plane.fetch_artifact,
        spec,
        worker.config.engine.max_lora_rank,
        worker.config.max_adapter_bytes,
        busy=engine.is_loading,
    )
    limits = RequestLimits(
        max_tokens_limit=worker.config.max_tokens_limit,
        default_max_tokens=worker.config.default_max_tokens,
        vocab_size=spec.vocab_size,
        max_model_len=engine.max_model_len,
    )
    return GenerationService(
        engine, worker.control_plane, artifacts, worker.usage, worker.metrics, worker.state, limits
    )


def _generate(service, key: str, **fields):
    request = inference_pb2.GenerateRequest(**fields)
    return service.generate(
        key, requested_adapter_names(request), lambda: check_request(request, service.limits)
    )


def _stream(service, key: str, request_id: str, max_tokens: int, **fields):
    """A stream of PROMPT under `request_id`, closed when the block ends (as the servicer closes it)."""
    sampling = inference_pb2.SamplingParams(max_tokens=max_tokens)
    return contextlib.aclosing(
        _generate(service, key, prompt=PROMPT, request_id=request_id, sampling=sampling, **fields)
    )


async def _cancel_when(consume, ready: asyncio.Event) -> None:
    """Runs `consume()` and cancels it once `ready` is set."""
    task = asyncio.get_running_loop().create_task(consume())
    await ready.wait()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _lag_until_idle(engine) -> None:
    """Returns once the engine ran every request to its end and their outputs wait in their streams."""
    while engine.engine.has_unfinished():
        await asyncio.sleep(0.01)
    await engine.wait_delivered()


def _joined(chunks) -> tuple[list[int], str, list[float]]:
    return (
        [t for c in chunks for t in c.token_ids],
        "".join(c.text for c in chunks),
        [p for c in chunks for p in c.logprobs],
    )


def test_lagging_consumer_gets_the_first_token_alone_then_one_chunk_equal_to_an_eager_stream(system, service):
    _, _, key = system.new_tenant()
    fields = dict(
        prompt=PROMPT,
        adapter="ad1",
        logprobs=True,
        sampling=inference_pb2.SamplingParams(max_tokens=12),
    )

    async def eager():
        async with contextlib.aclosing(_generate(service, key, **fields)) as chunks:
            return [chunk async for chunk in chunks]

    async def lagging():
        async with contextlib.aclosing(_generate(service, key, **fields)) as chunks:
            first = await anext(chunks)
            await _lag_until_idle(system.worker.engine)
            return first, [chunk async for chunk in chunks]

    kept_up = system.loop.run(eager())
    first, rest = system.loop.run(lagging())
    assert len(first.token_ids) == 1 and first.finish is None and first.text
    assert len(rest) == 1  # eleven steps' tokens in one message
    (coalesced,) = rest
    assert len(coalesced.token_ids) == 11 and coalesced.finish is not None
    assert coalesced.finish.reason == "length" and coalesced.finish.completion_tokens == 12
    want_ids, want_text, want_logprobs = _joined(kept_up)
    ids, text, logprobs = _joined([first, coalesced])
    assert ids == want_ids and text == want_text and len(ids) == 12
    assert logprobs == pytest.approx(want_logprobs, rel=1e-5) and len(logprobs) == 12


def test_cancel_after_a_coalesced_chunk_bills_exactly_the_tokens_delivered(system, service):
    tenant, _, key = system.new_tenant()
    _, _, other_key = system.new_tenant()
    received = []
    coalesced = asyncio.Event()

    async def consume():
        # Nothing is awaited between taking a chunk and asking for the next here: the cancel lands while
        # the generator waits for the engine, after every chunk taken was counted.
        async with _stream(service, key, f"coalesced-{uuid.uuid4().hex}", 400, adapter="ad2") as chunks:
            async for chunk in chunks:
                received.append(chunk)
                if len(received) == 1:
                    # Lag while another call runs 8 tokens to its end: each of its steps decodes this one too.
                    async with contextlib.aclosing(
                        _generate(service, other_key, prompt=PROMPT, sampling={"max_tokens": 8})
                    ) as other:
                        async for _ in other:
                            pass
                    await system.worker.engine.wait_delivered()
                elif len(received) == 2:
                    coalesced.set()

    system.loop.run(_cancel_when(consume, coalesced))
    assert len(received[0].token_ids) == 1 and len(received[1].token_ids) >= 7
    delivered = sum(len(c.token_ids) for c in received)
    assert all(c.finish is None for c in received) and delivered < 400
    system.flush_usage()
    usage = system.wait_usage(tenant, 1)
    assert usage.total_requests == 1 and usage.total_completion_tokens == delivered


@pytest.mark.parametrize(("max_tokens", "taken"), [(1, 1), (400, 3)])
def test_a_cancel_while_the_transport_writes_a_chunk_bills_that_chunk(system, service, max_tokens, taken):
    """The servicer awaits the transport's write of each chunk it took; a cancellation landing there may
    come after the caller got the chunk. It is billed (a 1-token answer with its prompt, too): counted
    only when the next was asked for, such chunks went unbilled."""
    tenant, _, key = system.new_tenant()
    received = []
    writing = asyncio.Event()

    async def consume():
        async with _stream(service, key, f"cancel-in-write-{uuid.uuid4().hex}", max_tokens) as chunks:
            async for chunk in chunks:
                received.append(chunk)
                if len(received) == taken:
                    writing.set()
                    await asyncio.sleep(3600)  # the write the cancellation interrupts

    system.loop.run(_cancel_when(consume, writing))
    delivered = sum(len(c.token_ids) for c in received)
    assert len(received) == taken and delivered >= taken
    system.flush_usage()
    usage = system.wait_usage(tenant, 1)
    assert (usage.total_requests, usage.total_completion_tokens) == (1, delivered)
    assert usage.total_prompt_tokens > 0


def test_a_stream_is_in_the_spool_as_its_first_chunk_is_handed_over(system, service):
    """A SIGKILL leaves only the spool: a stream's first chunk is checkpointed as it is handed over, not
    at the timer's next tick (up to 0.5 s later, by which time a short answer was delivered unbilled)."""
    _, _, key = system.new_tenant()
    request_id = f"first-checkpoint-{uuid.uuid4().hex}"
    spool = system.worker.usage._path

    async def first_chunk_then_read_the_spool():
        async with _stream(service, key, request_id, 400) as chunks:
            first = await anext(chunks)
            lines = spool.read_text().splitlines()  # nothing awaited since the chunk was counted
            return first, [json.loads(line) for line in lines if request_id in line]

    first, records = system.loop.run(first_chunk_then_read_the_spool())
    assert len(first.token_ids) == 1
    assert records and records[-1]["completion_tokens"] == 1
    assert records[-1]["finish_reason"] == "interrupted"


def _forget_acknowledged_ids(service, monkeypatch) -> None:
    """The worker answers only for usage still spooled, as for an id another worker billed: the refusal
    must then come from the control plane's reservation, beside the engine (what these tests check), not
    from the worker's own memory of acknowledged ids, which refuses before anything starts."""
    monkeypatch.setattr(service._usage, "has_recorded", service._usage.has_pending)


def test_refused_request_id_leaves_no_artifact_held_and_a_failed_prompt_gives_its_id_back(
    system, service, monkeypatch
):
    tenant, _, key = system.new_tenant()
    request_id = f"overlap-{uuid.uuid4().hex}"

    async def run(**fields):
        async with contextlib.aclosing(_generate(service, key, request_id=request_id, **fields)) as chunks:
            return [chunk async for chunk in chunks]

    # Prepared beside the reservation, the prompt fails: the id was reserved, and is given back.
    with pytest.raises(RequestFieldError) as too_long:
        system.loop.run(run(prompt="x" * 100_000, adapter="ad3"))
    assert too_long.value.field == "prompt"
    served = system.loop.run(run(prompt=PROMPT, adapter="ad3", sampling={"max_tokens": 3}))
    assert sum(len(c.token_ids) for c in served) == 3
    system.flush_usage()
    system.wait_usage(tenant, 1)
    _forget_acknowledged_ids(service, monkeypatch)
    # Billed now: the same id is refused, and the adapter resolved beside the refusal is not kept held.
    with pytest.raises(ControlPlaneError) as refused:
        system.loop.run(run(prompt=PROMPT, adapter="ad3", sampling={"max_tokens": 3}))
    assert refused.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert not service._artifacts.is_held(system.adapters["ad3"])
    # As the worker remembers it (its usage acknowledged): refused at once, nothing held either.
    monkeypatch.undo()
    with pytest.raises(RequestIdUsed):
        system.loop.run(run(prompt=PROMPT, adapter="ad3", sampling={"max_tokens": 3}))
    assert not service._artifacts.is_held(system.adapters["ad3"])
    assert system.admin.usage(tenant).total_completion_tokens == 3


def test_reservation_overlaps_the_engine_and_a_refusal_delivers_nothing(system, service, monkeypatch):
    tenant, _, key = system.new_tenant()
    engine = system.worker.engine
    request_id = f"overlap-{uuid.uuid4().hex}"
    reserve = service._cp.reserve_request_id
    in_engine_before_answer = []

    async def reserve_once_the_engine_has_the_request(*args, **kwargs):
        # Answers only once the call's request reached the engine: a call that waited for the answer
        # before submitting would never get there (the wait gives up after 30 s and says so).
        for _ in range(3000):
            if engine.num_running + engine.num_waiting > 0:
                in_engine_before_answer.append(True)
                break
            await asyncio.sleep(0.01)
        else:
            in_engine_before_answer.append(False)
        return await reserve(*args, **kwargs)

    monkeypatch.setattr(service._cp, "reserve_request_id", reserve_once_the_engine_has_the_request)

    async def run():
        chunks = []
        async with contextlib.aclosing(
            # long enough to be seen running in the engine
            _generate(service, key, prompt=PROMPT, request_id=request_id, sampling={"max_tokens": 64})
        ) as stream:
            async for chunk in stream:
                chunks.append(chunk)
        return chunks

    served = system.loop.run(run())
    assert sum(len(c.token_ids) for c in served) == 64
    system.flush_usage()
    system.wait_usage(tenant, 1)
    _forget_acknowledged_ids(service, monkeypatch)
    with pytest.raises(ControlPlaneError) as refused:  # billed now: the id is used
        system.loop.run(run())
    assert refused.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert in_engine_before_answer == [True, True]

    async def engine_idle() -> bool:  # the refused call's engine request was aborted
        for _ in range(3000):
            if not engine.engine.has_unfinished():
                return True
            await asyncio.sleep(0.01)
        return False

    assert system.loop.run(engine_idle())
    system.flush_usage()
    usage = system.admin.usage(tenant)
    assert usage.total_requests == 1 and usage.total_completion_tokens == 64


def test_a_stream_running_past_its_reservations_time_to_live_keeps_its_id(system, service, monkeypatch):
    """A reservation was made once, for 120 s: a stream running longer (a long generation, a slow GPU,
    a worker paused) let another worker serve the same id again in full, both answers billed once. It is
    renewed while the stream runs (here with a 1 s time to live)."""
    tenant, _, key = system.new_tenant()
    tenant_id = system.tenant_ids[tenant]
    monkeypatch.setattr(service, "_reservation_ms", 1000)
    request_id = f"long-{uuid.uuid4().hex}"

    async def other_worker_reserves() -> grpc.StatusCode:
        try:
            await service._cp.reserve_request_id(tenant_id, request_id, "another-worker", 1000)
        except ControlPlaneError as error:
            return error.code
        return grpc.StatusCode.OK

    async def run() -> list[grpc.StatusCode]:
        codes = []
        async with _stream(service, key, request_id, max_tokens=8) as stream:
            await anext(stream)  # running: reserved
            for _ in range(3):  # held open for 3x the reservation's time to live
                await asyncio.sleep(1.0)
                codes.append(await other_worker_reserves())
        return codes

    assert system.loop.run(run()) == [grpc.StatusCode.ALREADY_EXISTS] * 3


def test_a_worker_with_a_stream_interval_holds_tokens_back_but_never_the_first_or_the_end(
    system, make_worker
):
    """`--stream-interval 4` over real gRPC: the first token alone and at once, then messages of at least
    four tokens but the last, which ends the answer as soon as it is made; the same tokens and text as a
    worker that sends every step's token (the system's, at the default of 1)."""
    worker = make_worker(stream_interval=4)
    _, _, key = system.new_tenant()
    fields = dict(prompt=PROMPT, adapter="ad1", max_tokens=15, temperature=0.0)
    with Client(f"127.0.0.1:{worker.port}", key) as held, Client(system.target, key) as eager:
        messages = list(held.generate_stream(**fields))
        every_step = list(eager.generate_stream(**fields))
        short = list(held.generate_stream(**(fields | {"max_tokens": 2})))
    sizes = [len(m.token_ids) for m in messages]
    assert sizes[0] == 1 and sum(sizes) == 15 and len(sizes) <= 5
    assert all(n >= 4 for n in sizes[1:-1]) and sizes[-1] >= 1 and messages[-1].finish_reason
    assert [t for m in messages for t in m.token_ids] == [t for m in every_step for t in m.token_ids]
    assert "".join(m.text for m in messages) == "".join(m.text for m in every_step)
    # fewer tokens than the interval: the end is not held back for more
    assert [len(m.token_ids) for m in short] == [1, 1] and short[-1].usage.completion_tokens == 2


def test_a_stream_interval_outside_its_bounds_is_refused_naming_it(tmp_path):
    from data_plane.server.config import MAX_STREAM_INTERVAL, WorkerConfig

    common = dict(model_dir=tmp_path, control_plane_target="cp:1", worker_token="t", state_dir=tmp_path)
    assert WorkerConfig(**common, stream_interval=MAX_STREAM_INTERVAL).stream_interval == MAX_STREAM_INTERVAL
    for bad in (0, -1, MAX_STREAM_INTERVAL + 1):
        with pytest.raises(ValueError, match="stream_interval"):
            WorkerConfig(**common, stream_interval=bad)
