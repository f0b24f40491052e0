"""A database outage reaches the control plane's callers as UNAVAILABLE (retry later), never INTERNAL.

The test runs its own PostgreSQL (never the machine's) and stops it under a running control plane."""

from __future__ import annotations

import grpc
import pytest

from control_plane.server.server import serve
from openlora.embedded import EmbeddedPostgres
from openlora.v1 import worker_pb2

from .conftest import ControlPlaneHandle, make_config


@pytest.fixture
def own_postgres(server_state_dir):
    server = EmbeddedPostgres(server_state_dir)
    server.start()
    yield server
    server.stop()


def test_stopped_database_is_unavailable_to_admin_and_worker_calls(own_postgres, server_thread, tmp_path):
    config = make_config(own_postgres.url, tmp_path / "cp", None, admin_key="operator-key-for-outage")
    running = server_thread.run(serve(config))
    cp = ControlPlaneHandle(running, config, running.admin_key)
    try:
        with cp.admin() as admin:
            admin.create_tenant("before-outage")
            key = admin.create_api_key("before-outage").secret
            own_postgres.stop()
            with pytest.raises(grpc.RpcError) as refused:
                admin.create_tenant("during-outage")
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
        with pytest.raises(grpc.RpcError) as refused:
            cp.worker_stub().Authorize(
                worker_pb2.AuthorizeRequest(api_key=key), metadata=cp.worker_metadata()
            )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
    finally:
        server_thread.run(running.stop(0))
