"""A listener whose address is taken stops the server with one line naming the address and the flag that
moves it (gRPC raised a bare "Failed to bind" RuntimeError, logged as a traceback on every restart)."""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest

from openlora.commands import serving
from openlora.listen import ListenError, bind


def test_a_taken_port_is_a_listen_error_naming_the_address_and_the_flag():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    address = f"127.0.0.1:{taken.getsockname()[1]}"

    async def main():
        server = grpc.aio.server()
        try:
            with pytest.raises(ListenError) as refused:
                bind(server, address, "--listen (OPENLORA_LISTEN)")
            free = bind(server, "127.0.0.1:0", "--listen (OPENLORA_LISTEN)")
        finally:
            await server.stop(0)
        return str(refused.value), free

    try:
        message, free = asyncio.run(main())
    finally:
        taken.close()
    assert address in message and "--listen (OPENLORA_LISTEN)" in message
    assert free > 0


def test_the_worker_command_reports_a_taken_port_in_one_line_and_exits_1(monkeypatch, capsys, tmp_path):
    import data_plane.server.main as worker_main

    def taken(config):
        raise ListenError("cannot listen on 127.0.0.1:1: the port is in use")

    monkeypatch.setattr(worker_main, "run_worker", taken)
    parser = serving.argparse.ArgumentParser()
    serving.add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["worker", "--model", str(tmp_path), "--control-plane", "127.0.0.1:1", "--worker-token", "t"]
    )
    assert args.func(args) == 1
    err = capsys.readouterr().err
    assert err.strip() == "error: cannot listen on 127.0.0.1:1: the port is in use"
