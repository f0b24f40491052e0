"""The worker's control-plane client when the control plane cannot be reached."""

from __future__ import annotations

import asyncio
import socket

import grpc

from data_plane.server.control_plane_client import ControlPlaneClient, ControlPlaneError


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_control_plane_is_unavailable_to_the_caller():
    async def scenario():
        client = ControlPlaneClient(f"127.0.0.1:{_closed_port()}", "token")
        try:
            await client.authorize("olk_key", ("a",), "tiny")
        except ControlPlaneError as error:
            return error
        finally:
            await client.close()

    error = asyncio.run(scenario())
    assert isinstance(error, ControlPlaneError)
    assert error.code == grpc.StatusCode.UNAVAILABLE
