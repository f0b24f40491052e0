"""`openlora up` whose worker port is taken after up's own check, before the worker binds it (another
program's outgoing connection can hold any port of the ephemeral range, where the default ports lie):
the worker exits, `up` logs why with the flag of `up` that moves the port, starts the worker again, and
gets to its ready line once the port is free."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.e2e.test_up import REPO_ROOT, _read_ready_line
from tests.e2e.up_process import stop_up, stopping_up, up_command

pytestmark = pytest.mark.slow
support = sys.modules["worker_test_support"]  # loaded by this directory's conftest


def _wait_for(condition, process: subprocess.Popen, log_path: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"up exited ({process.poll()}):\n{log_path.read_text(errors='replace')}")
        time.sleep(0.1)


def _hold_as_local_port(port: int, peer: socket.socket) -> socket.socket:
    """An outgoing connection to `peer` whose local port is `port`, as the kernel may pick for any
    client (no SO_REUSEADDR, so no server can bind the port while it lives)."""
    client = socket.socket()
    client.bind(("127.0.0.1", port))  # fails if the worker already listens there
    client.connect(peer.getsockname())
    return client


def _start_holding_the_worker_port(
    argv_for, log_path: Path, peer: socket.socket
) -> tuple[subprocess.Popen, int, socket.socket]:
    """`up` (the argv and environment `argv_for(port)` gives) with its worker on a port picked free, which
    this test then holds as an outgoing connection's local port, once up has checked its ports (its
    control plane started) and before the worker binds it: (up, the port, that connection). When something
    else took the port first (up refused it, or the test could not bind it), up is stopped and the error
    says the port was taken (for support.retry_on_taken_port)."""
    port = support.free_port()
    argv, env = argv_for(port)
    with open(log_path, "wb") as up_log:
        process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=up_log, cwd=REPO_ROOT)
    try:
        up = psutil.Process(process.pid)
        # The control plane starts after up checked its ports and before the worker starts.
        _wait_for(lambda: any("control-plane" in p.cmdline() for p in up.children()), process, log_path)
        return process, port, _hold_as_local_port(port, peer)
    except BaseException:
        stop_up(process)
        raise


def test_up_restarts_a_worker_whose_port_was_taken_while_it_started(
    database_url, redis_url, e2e_model_dir, tmp_path
):
    def argv_for(port: int) -> tuple[list[str], dict[str, str]]:
        return up_command(
            tmp_path,
            e2e_model_dir,
            *("--database-url", database_url, "--redis-url", redis_url),
            *("--port", str(port), "--http-port", "0"),
        )

    log_path = tmp_path / "up.log"
    peer = socket.create_server(("127.0.0.1", 0))
    try:
        process, port, held = support.retry_on_taken_port(
            lambda: _start_holding_the_worker_port(argv_for, log_path, peer)
        )
        with stopping_up(process):
            _wait_for(lambda: "worker exited" in log_path.read_text(errors="replace"), process, log_path)
            held.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            held.close()  # reset, not TIME_WAIT: the port is free at once

            ready = _read_ready_line(process, timeout_s=180)
            assert f"inference=127.0.0.1:{port}" in ready
            log = log_path.read_text(errors="replace")
            exited = next(line for line in log.splitlines() if "worker exited" in line)
            assert "(exit 1)" in exited
            assert f"port {port} (the worker's gRPC inference API) cannot be used" in exited
            assert "choose another with --port" in exited
            assert "OPENLORA_LISTEN" not in exited
    finally:
        peer.close()
