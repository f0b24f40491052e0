"""Uploads cut short: the client leaves mid-stream, the control plane is SIGKILLed mid-stream, PostgreSQL
is down. Nothing half-written is listed or served, a retry of the same upload succeeds and serves."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from openlora.admin_client import adapter_files, upload_requests
from openlora.client import Client
from openlora.v1 import admin_pb2, admin_pb2_grpc

from .conftest import ADMIN_KEY, BASE_MODEL, support

pytestmark = pytest.mark.slow


def _header(name: str, tenant: str) -> admin_pb2.UploadAdapterHeader:
    return admin_pb2.UploadAdapterHeader(
        name=name, visibility=admin_pb2.VISIBILITY_PRIVATE, base_model=BASE_MODEL, tenant=tenant
    )


def _stalled_upload(target: str, directory, name: str, tenant: str, stop: threading.Event):
    """An upload that sends the header and the first chunk, then waits for `stop` before giving up."""
    channel = grpc.insecure_channel(target)
    stub = admin_pb2_grpc.AdminServiceStub(channel)
    requests = upload_requests(_header(name, tenant), adapter_files(directory), chunk_bytes=1024)
    sent = threading.Event()

    def stream():
        yield next(requests)
        yield next(requests)
        sent.set()
        stop.wait(120)

    future = stub.UploadAdapter.future(
        stream(), metadata=(("authorization", f"Bearer {ADMIN_KEY}"),), timeout=120
    )
    assert sent.wait(30)
    return channel, future


def _names(fault_system, tenant: str) -> list[str]:
    return [a.name for a in fault_system.admin.list_adapters(tenant=tenant)]


def test_uploads_cut_short_publish_nothing_and_a_retry_serves(fault_system, fault_postgres):
    worker = fault_system.spawn_worker()
    tenant, key = fault_system.tenant_with_key()
    directory = fault_system.model_dir / "adapters" / support.ADAPTER_NAMES[0]
    tmp_root = fault_system.control_plane.state_dir / "artifacts" / ".tmp"

    # The client leaves mid-stream.
    stop = threading.Event()
    channel, future = _stalled_upload(fault_system.control_plane.target, directory, "cut", tenant, stop)
    time.sleep(0.5)
    future.cancel()
    stop.set()
    channel.close()
    time.sleep(0.5)
    assert _names(fault_system, tenant) == []

    # The control plane dies mid-stream.
    stop = threading.Event()
    channel, future = _stalled_upload(fault_system.control_plane.target, directory, "cut", tenant, stop)
    time.sleep(0.5)
    fault_system.control_plane.process.kill()
    with pytest.raises(grpc.RpcError) as died:
        future.result(timeout=30)
    stop.set()
    channel.close()
    assert died.value.code() == grpc.StatusCode.UNAVAILABLE
    fault_system.restart_control_plane()
    assert _names(fault_system, tenant) == []
    assert list(tmp_root.iterdir()) == []

    # PostgreSQL is down: the upload is refused as retryable.
    fault_postgres.stop()
    try:
        with pytest.raises(grpc.RpcError) as down:
            fault_system.admin.upload_adapter(directory, "cut", BASE_MODEL, tenant=tenant)
        assert down.value.code() == grpc.StatusCode.UNAVAILABLE, down.value.details()
    finally:
        fault_postgres.start()

    deadline = time.monotonic() + 60
    while True:
        try:
            fault_system.admin.upload_adapter(directory, "cut", BASE_MODEL, tenant=tenant)
            break
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, error
            time.sleep(0.5)
    assert _names(fault_system, tenant) == ["cut"]
    with Client(worker.target, key) as client:
        assert client.complete("hello", adapter="cut", max_tokens=4)
    assert list(tmp_root.iterdir()) == []  # no upload's partial files are left behind
