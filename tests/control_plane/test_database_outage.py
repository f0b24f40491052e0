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


def test_a_database_that_never_answers_fails_the_connection_within_the_connect_timeout():
    """A listener that takes the TCP connection but never speaks (a hung database host): the connection
    attempt fails as OperationalError (UNAVAILABLE to callers) after libpq's connect_timeout, not after the
    caller's deadline or the OS's minutes."""
    import socket
    import time

    from sqlalchemy import exc as sa_exc

    from control_plane.db.engine import CONNECT_ARGS, make_engine

    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)  # the kernel completes handshakes; nobody ever reads or answers
        engine = make_engine(f"postgresql://postgres@127.0.0.1:{mute.getsockname()[1]}/test")
        started = time.monotonic()
        with pytest.raises(sa_exc.OperationalError):
            engine.connect()
        elapsed = time.monotonic() - started
        engine.dispose()
    assert elapsed < CONNECT_ARGS["connect_timeout"] * 3


def _health(target: str) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def _wait_health(target: str, status: int, timeout_s: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while _health(target) != status:
        assert time.monotonic() < deadline, f"health did not become {status}"
        time.sleep(0.2)


def test_health_is_not_serving_while_the_database_is_frozen_and_serving_once_it_answers(
    own_postgres, server_thread, tmp_path
):
    """A frozen database (its server paused: connections are accepted, never answered) left health
    SERVING while every call waited and failed; health now follows the database."""
    import os
    import signal

    from grpc_health.v1 import health_pb2

    config = make_config(own_postgres.url, tmp_path / "cp", None, admin_key="operator-key-for-freeze")
    running = server_thread.run(serve(config))
    target = f"127.0.0.1:{running.port}"
    postmaster = own_postgres._process.pid
    try:
        assert _health(target) == health_pb2.HealthCheckResponse.SERVING
        os.kill(postmaster, signal.SIGSTOP)
        try:
            _wait_health(target, health_pb2.HealthCheckResponse.NOT_SERVING)
        finally:
            os.kill(postmaster, signal.SIGCONT)
        _wait_health(target, health_pb2.HealthCheckResponse.SERVING)
    finally:
        server_thread.run(running.stop(0))
