"""Draining: NOT_SERVING at once, new calls UNAVAILABLE, in-flight streams run to their end."""

from __future__ import annotations

import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from openlora import errors
from openlora.client import Client


def test_stop_drains_in_flight_stream_and_refuses_new_calls(system, spare_worker):
    """The engine is held between steps from the stream's first token until the refusal is checked, so a
    new call always meets the draining worker with the stream still in flight (the check was skipped
    whenever the 500 tokens ended first)."""
    _, _, key = system.new_tenant()
    target = f"127.0.0.1:{spare_worker.port}"
    outcome: dict = {"tokens": 0, "error": None}
    first = threading.Event()
    engine = spare_worker.engine.engine
    real_step, held = engine.step, threading.Event()

    def step():
        if held.is_set():
            threading.Event().wait(0.005)
            return []
        return real_step()

    engine.step = step

    def stream():
        try:
            with Client(target, key) as client:
                for response in client.generate_stream(prompt="hello", max_tokens=500):
                    if not first.is_set():
                        held.set()  # no step after this one until the refusal was checked
                    outcome["tokens"] += len(response.token_ids)
                    first.set()
        except errors.OpenLoRAError as error:
            outcome["error"] = error
        first.set()

    thread = threading.Thread(target=stream)
    thread.start()
    try:
        assert first.wait(60)
        done = threading.Event()

        def begin_stop():
            task = system.loop.loop.create_task(spare_worker.stop(30.0))
            task.add_done_callback(lambda _task: done.set())

        system.loop.loop.call_soon_threadsafe(begin_stop)
        with grpc.insecure_channel(target) as channel:
            status = None
            for _ in range(100):
                status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status
                if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert not done.is_set()  # the stream is held mid-way: the drain waits for it
        with Client(target, key) as client, pytest.raises(errors.Unavailable) as refused:
            client.complete("hello", max_tokens=2)
        assert "draining" in refused.value.details
    finally:
        held.clear()
        engine.step = real_step
    thread.join(60)
    assert done.wait(60)
    assert outcome["error"] is None
    assert outcome["tokens"] == 500


def test_stop_finishes_when_a_background_task_swallows_its_cancellation(system, spare_worker, monkeypatch):
    # A client library can swallow the cancellation that lands inside its blocking read; the worker must
    # stop anyway (bounded), leaving that task behind.
    import asyncio

    from data_plane.server import main

    monkeypatch.setattr(main, "TASK_STOP_TIMEOUT_S", 0.5)
    swallowed = []
    hold = True

    async def stubborn() -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if not hold:
                    raise
                swallowed.append(1)

    async def add_stubborn() -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(stubborn(), name="stubborn")
        spare_worker._tasks.append(task)
        await asyncio.sleep(0)
        return task

    async def release(task: asyncio.Task) -> None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    task = system.loop.run(add_stubborn())
    system.loop.run(spare_worker.stop(1.0), 30)  # TimeoutError here if stop waited on the task
    assert swallowed and not task.done()
    hold = False
    system.loop.run(release(task), 10)
    assert task.cancelled()


def test_the_engine_watch_survives_a_failed_round_and_still_reports_a_stopped_engine(system, spare_worker):
    """The watch was a task that one exception ended for good (a gauge read once raised 'deque mutated
    during iteration'): after it, an engine that stopped was never reported NOT_SERVING."""
    failures = {"left": 3}
    gauge = spare_worker.metrics.running
    real_set = gauge.set

    def failing_set(value):
        if failures["left"] > 0:
            failures["left"] -= 1
            raise RuntimeError("injected: a round of the watch fails")
        real_set(value)

    gauge.set = failing_set
    target = f"127.0.0.1:{spare_worker.port}"
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(200):
            if failures["left"] == 0:
                break
            threading.Event().wait(0.05)
        assert failures["left"] == 0
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        system.loop.run(spare_worker.engine.stop())  # the engine loop ends, as it does after a fatal fault
        status = None
        for _ in range(200):
            status = health.Check(health_pb2.HealthCheckRequest()).status
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            threading.Event().wait(0.05)
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert spare_worker.metrics.background_errors.labels("engine_watch")._value.get() == 3
