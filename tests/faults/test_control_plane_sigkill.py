"""SIGKILL of the control plane while a worker streams and reports usage, then a restart on the same port
and database: the streams finish, calls of a cached key go on being served meanwhile, and all the usage
arrives exactly once."""

from __future__ import annotations

import time

import pytest

from openlora.client import Client
from openlora.v1.inference_pb2 import FINISH_REASON_LENGTH as LENGTH

from .conftest import start_stream

pytestmark = pytest.mark.slow

STREAM_TOKENS = 2500
SHORT_TOKENS = 8


def _spool_drained(spool_path) -> bool:
    return not spool_path.exists() or not spool_path.read_text().strip()


def test_control_plane_killed_and_restarted_under_traffic_loses_and_doubles_no_usage(fault_system):
    worker = fault_system.spawn_worker()
    tenant, key = fault_system.tenant_with_key()
    with Client(worker.target, key) as client:
        for i in range(3):
            assert client.complete("hello", max_tokens=SHORT_TOKENS, request_id=f"before-{i}")
    streams = [
        start_stream(worker.target, key, prompt="hello", max_tokens=STREAM_TOKENS, request_id=f"flight-{i}")
        for i in range(2)
    ]
    for stream in streams:
        assert stream.started.wait(60)
    fault_system.control_plane.process.kill()
    with Client(worker.target, key) as client:
        for i in range(3):
            assert client.complete("hello", max_tokens=SHORT_TOKENS, request_id=f"during-{i}")
        assert client.complete("hello", max_tokens=SHORT_TOKENS)
    fault_system.restart_control_plane()
    with Client(worker.target, key) as client:
        for i in range(2):
            assert client.complete("hello", max_tokens=SHORT_TOKENS, request_id=f"after-{i}")
    for stream in streams:
        assert stream.done.wait(120), fault_system.logs()
        assert (stream.error, stream.num_tokens, stream.finish_reason) == (None, STREAM_TOKENS, LENGTH)

    num_requests = 3 + 4 + 2 + len(streams)
    expected_tokens = (3 + 4 + 2) * SHORT_TOKENS + len(streams) * STREAM_TOKENS
    usage = fault_system.wait_usage(tenant, num_requests, timeout_s=90)
    assert (usage.total_requests, usage.total_completion_tokens) == (num_requests, expected_tokens), (
        fault_system.logs()
    )
    spool_path = worker.state_dir / "usage_spool.jsonl"
    deadline = time.monotonic() + 60
    while not _spool_drained(spool_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _spool_drained(spool_path), fault_system.logs()
    usage = fault_system.admin.get_usage(tenant)
    assert (usage.total_requests, usage.total_completion_tokens) == (num_requests, expected_tokens)
    assert worker.process.poll() is None
