"""Redis carries only advisory traffic: stopped while a worker serves, or already down when one starts, no
inference request fails and billing is complete."""

from __future__ import annotations

import pytest

from openlora.client import Client
from openlora.v1.inference_pb2 import FINISH_REASON_LENGTH as LENGTH

from .conftest import start_stream

pytestmark = pytest.mark.slow


def test_redis_stopped_while_serving_or_down_at_start_causes_no_inference_error(fault_system, fault_redis):
    worker = fault_system.spawn_worker()
    tenant, key = fault_system.tenant_with_key()
    with Client(worker.target, key) as client:
        assert client.complete("hello", max_tokens=8, request_id="before")
    stream = start_stream(worker.target, key, prompt="hello", max_tokens=600, request_id="across")
    assert stream.started.wait(60)

    fault_redis.stop()
    with Client(worker.target, key) as client:
        for i in range(3):
            assert client.complete("hello", max_tokens=8, request_id=f"during-{i}")
        assert client.complete("hello", max_tokens=8)
    assert stream.done.wait(120)
    assert (stream.error, stream.num_tokens, stream.finish_reason) == (None, 600, LENGTH)

    started_without_redis = fault_system.spawn_worker()  # its --redis-url names the stopped server
    with Client(started_without_redis.target, key) as client:
        for i in range(2):
            assert client.complete("hello", max_tokens=8, request_id=f"late-{i}")

    num_requests = 1 + 1 + 4 + 2
    usage = fault_system.wait_usage(tenant, num_requests)
    assert (usage.total_requests, usage.total_completion_tokens) == (num_requests, 600 + 7 * 8)
    assert worker.process.poll() is None and started_without_redis.process.poll() is None
