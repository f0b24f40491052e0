"""Draining: NOT_SERVING at once, new calls UNAVAILABLE, in-flight streams run to their end."""

from __future__ import annotations

import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from openlora import errors
from openlora.client import Client


def test_stop_drains_in_flight_stream_and_refuses_new_calls(system, spare_worker):
    _, _, key = system.new_tenant()
    target = f"127.0.0.1:{spare_worker.port}"
    outcome: dict = {"tokens": 0, "error": None}
    first = threading.Event()

    def stream():
        try:
            with Client(target, key) as client:
                for response in client.generate_stream(prompt="hello", max_tokens=500):
                    outcome["tokens"] += len(response.token_ids)
                    first.set()
        except errors.OpenLoRAError as error:
            outcome["error"] = error
        first.set()

    thread = threading.Thread(target=stream)
    thread.start()
    assert first.wait(60)
    stopping = system.loop.loop.call_soon_threadsafe
    done = threading.Event()
    future = None

    def begin_stop():
        nonlocal future
        future = system.loop.loop.create_task(spare_worker.stop(30.0))
        future.add_done_callback(lambda _f: done.set())

    stopping(begin_stop)
    with grpc.insecure_channel(target) as channel:
        status = None
        for _ in range(100):
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    refused = None
    if not done.is_set():
        with Client(target, key) as client, pytest.raises(errors.Unavailable) as refused:
            client.complete("hello", max_tokens=2)
    thread.join(60)
    assert done.wait(60)
    assert outcome["error"] is None
    assert outcome["tokens"] == 500
    if refused is not None:
        assert "draining" in refused.value.details or "connect" in refused.value.details.lower()
