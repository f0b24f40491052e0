"""PostgreSQL stopped and started again under traffic: streams in flight finish, keys used before the
outage keep being served during it (the worker's cached authorization), with or without a client
request id, and after the restart all usage arrives exactly once."""

from __future__ import annotations

import time

import pytest

from openlora.client import Client
from openlora.v1.inference_pb2 import FINISH_REASON_LENGTH as LENGTH

from .conftest import start_stream

pytestmark = pytest.mark.slow

STREAM_TOKENS = 2500
SHORT_TOKENS = 8


def test_postgres_outage_keeps_serving_cached_keys_and_usage_arrives_once(fault_system, fault_postgres):
    worker = fault_system.spawn_worker("--auth-cache-ttl-s", "10")
    tenant, key = fault_system.tenant_with_key()
    with Client(worker.target, key) as client:  # the key is used, so authorized and cached
        assert client.complete("hello", max_tokens=SHORT_TOKENS, request_id="before")
        assert client.complete("hello", max_tokens=SHORT_TOKENS)
    streams = [
        start_stream(worker.target, key, prompt="hello", max_tokens=STREAM_TOKENS, request_id=f"flight-{i}")
        for i in range(2)
    ]
    for stream in streams:
        assert stream.started.wait(60)

    fault_postgres.stop()
    try:
        assert not any(s.done.is_set() for s in streams), "the streams ended before the outage began"
        with Client(worker.target, key) as client:
            for i in range(2):
                assert client.complete("hello", max_tokens=SHORT_TOKENS, request_id=f"during-{i}")
            assert client.complete("hello", max_tokens=SHORT_TOKENS)
        for stream in streams:
            assert stream.done.wait(120)
            assert (stream.error, stream.num_tokens, stream.finish_reason) == (None, STREAM_TOKENS, LENGTH)
    finally:
        fault_postgres.start()  # the same port: the control plane reconnects where it was

    num_requests = 2 + len(streams) + 3
    expected_tokens = 5 * SHORT_TOKENS + len(streams) * STREAM_TOKENS
    usage = fault_system.wait_usage(tenant, num_requests, timeout_s=90)
    assert (usage.total_requests, usage.total_completion_tokens) == (num_requests, expected_tokens), (
        fault_system.logs()
    )
    # Nothing arrives a second time once the worker's spool has been resent.
    spool_path = worker.state_dir / "usage_spool.jsonl"
    deadline = time.monotonic() + 30
    while spool_path.exists() and spool_path.read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.2)
    usage = fault_system.admin.get_usage(tenant)
    assert (usage.total_requests, usage.total_completion_tokens) == (num_requests, expected_tokens)
