"""A flood of idle TCP connections, from a client with no key, does not take the gRPC servers' file
descriptors: the worker and the control plane each hold at most their `max_connections`, close the ones
that never complete a handshake within HANDSHAKE_TIMEOUT_S, and keep serving the connections they hold
(before the cap, one client's 20,000 idle connections took every descriptor of both: new calls failed and
the control plane lost its database)."""

from __future__ import annotations

import contextlib
import os
import socket
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from openlora.grpc_limits import HANDSHAKE_TIMEOUT_S

from .conftest import WORKER_TOKEN

CAP = 32
FLOOD = CAP + 100
SLACK = 8  # descriptors the process may open meanwhile (a log rotation, a channel's resolver)

pytestmark = pytest.mark.slow


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _serving(channel: grpc.Channel) -> bool:
    response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return response.status == health_pb2.HealthCheckResponse.SERVING


def _flood(port: int) -> list[socket.socket]:
    """FLOOD connections that never send a byte."""
    sockets = []
    for _ in range(FLOOD):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        sockets.append(s)
    return sockets


def _held_by_server(baseline: int) -> int:
    """Descriptors this process holds beyond `baseline` and the flood's own sockets: the server's side of
    the flood (the servers run in this process)."""
    return _open_fds() - baseline - FLOOD


def _assert_survives_a_flood(target: str) -> None:
    port = int(target.rsplit(":", 1)[1])
    with grpc.insecure_channel(target) as held:
        assert _serving(held)
        baseline = _open_fds()
        sockets = _flood(port)
        try:
            time.sleep(1.0)
            assert _held_by_server(baseline) <= CAP + SLACK  # without the cap: every one of FLOOD
            assert _serving(held)  # a connection it already holds keeps working
            deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S + 10
            while _held_by_server(baseline) > SLACK and time.monotonic() < deadline:
                time.sleep(0.5)
            assert _held_by_server(baseline) <= SLACK  # connections that never spoke are closed
            with grpc.insecure_channel(target) as fresh:
                assert _serving(fresh)  # and a new client gets in while the flood still holds its sockets
        finally:
            for s in sockets:
                s.close()


def test_a_worker_holds_at_most_its_connections_and_drops_those_that_never_speak(make_worker):
    worker = make_worker(max_connections=CAP)
    _assert_survives_a_flood(f"127.0.0.1:{worker.port}")


def test_the_control_plane_holds_at_most_its_connections_and_keeps_its_database(
    system, database_url, tmp_path
):
    from control_plane.config import ControlPlaneConfig
    from control_plane.server.server import serve

    cp = system.loop.run(
        serve(
            ControlPlaneConfig(
                database_url=database_url,
                state_dir=tmp_path,
                worker_token=WORKER_TOKEN,
                listen="127.0.0.1:0",
                max_connections=CAP,
            )
        )
    )
    try:
        _assert_survives_a_flood(cp.target)
    finally:
        system.loop.run(cp.stop(0))
