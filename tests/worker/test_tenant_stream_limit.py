"""One tenant's flood cannot take the queue every tenant shares: past its share of streams on a worker the
tenant alone gets RESOURCE_EXHAUSTED, while another tenant is still served, and its next call is served
again once one of its streams ended."""

from __future__ import annotations

import pytest

from openlora import errors
from openlora.client import Client

PROMPT = "the quick brown fox"


def test_a_tenant_past_its_stream_share_is_refused_alone(system, make_worker):
    worker = make_worker(max_streams_per_tenant=2)
    target = f"127.0.0.1:{worker.port}"
    _, _, flooder = system.new_tenant()
    _, _, other = system.new_tenant()
    with Client(target, flooder) as a, Client(target, other) as b:
        open_streams = [a.generate_stream(prompt=PROMPT, max_tokens=400) for _ in range(2)]
        for stream in open_streams:
            next(stream)  # both run now
        with pytest.raises(errors.ResourceExhausted, match="streams on this worker"):
            a.complete(PROMPT, max_tokens=2)
        assert b.complete(PROMPT, max_tokens=2)  # another tenant is not held back
        open_streams.pop().close()  # one of the flooder's streams ends (cancelled)
        for _ in range(100):  # the worker sees the cancellation shortly
            try:
                assert a.complete(PROMPT, max_tokens=2)
                break
            except errors.ResourceExhausted:
                continue
        else:
            pytest.fail("the tenant stayed refused after one of its streams ended")
        open_streams.pop().close()


def test_the_default_share_is_half_of_what_the_worker_holds(tmp_path):
    from data_plane.server.config import EngineSettings, WorkerConfig

    common = dict(model_dir=tmp_path, control_plane_target="x:1", worker_token="t", state_dir=tmp_path)
    config = WorkerConfig(**common, engine=EngineSettings(max_num_seqs=64), max_waiting=256)
    assert config.resolved_max_streams_per_tenant == 160
    with pytest.raises(ValueError, match="max_streams_per_tenant"):
        WorkerConfig(**common, max_streams_per_tenant=0)


def test_calls_cancelled_before_their_request_id_was_reserved_keep_their_place_until_it_answered(
    system, make_worker, monkeypatch
):
    """A call cancelled at once leaves its request id reservation (and then its release) running at the
    control plane: counted nowhere, a loop of such calls queued reservations without bound, ahead of every
    other tenant's (their first tokens seconds late, their reservations timing out unreserved). The call
    keeps its place in its tenant's share until that work answered."""

    import grpc

    from openlora.client import build_request
    from openlora.v1 import inference_pb2_grpc

    worker = make_worker(max_streams_per_tenant=2)
    target = f"127.0.0.1:{worker.port}"
    _, _, flooder = system.new_tenant()
    _, _, other = system.new_tenant()
    reserve = worker.control_plane.reserve_request_id
    asked = []  # reservations the control plane holds unanswered
    answer = system.loop.run(_event())

    async def slow_reserve(*args, **kwargs):
        asked.append(args)
        await answer.wait()
        return await reserve(*args, **kwargs)

    monkeypatch.setattr(worker.control_plane, "reserve_request_id", slow_reserve)
    channel = grpc.insecure_channel(target)
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    metadata = (("authorization", f"Bearer {flooder}"),)
    try:
        for i in range(2):  # two calls under request ids, cancelled before the reservation answered
            call = stub.Generate(
                build_request(PROMPT, max_tokens=400, request_id=f"gone-{i}"), metadata=metadata
            )
            _wait_for(lambda n=i + 1: len(asked) == n)
            call.cancel()
        _wait_for(lambda: worker.engine.num_running + worker.engine.num_waiting == 0)
        with Client(target, flooder) as a, Client(target, other) as b:
            with pytest.raises(errors.ResourceExhausted, match="streams on this worker"):
                a.complete(PROMPT, max_tokens=2)
            assert b.complete(PROMPT, max_tokens=2)  # another tenant is not held back
            system.loop.loop.call_soon_threadsafe(
                answer.set
            )  # the control plane answers: the places are given back
            for _ in range(100):
                try:
                    assert a.complete(PROMPT, max_tokens=2)
                    break
                except errors.ResourceExhausted:
                    continue
            else:
                pytest.fail("the tenant stayed refused after its reservations were answered")
    finally:
        system.loop.loop.call_soon_threadsafe(answer.set)
        channel.close()


async def _event():
    import asyncio

    return asyncio.Event()


def _wait_for(condition, timeout_s: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("timed out")
        time.sleep(0.01)
