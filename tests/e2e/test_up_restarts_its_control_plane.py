"""`openlora up` supervises every process it started, not only its worker: a control plane killed with
SIGKILL, or an embedded PostgreSQL or Redis, is started again on the same port and state; `up` keeps running, admin
calls work again, the worker serves, and the usage of a request made after the restart is recorded."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import psutil
import pytest

from openlora import errors
from openlora.admin_client import AdminClient
from openlora.client import Client
from tests.e2e.test_up import PROMPT
from tests.e2e.up_process import running_up, worker_children

pytestmark = pytest.mark.slow
RESTART_TIMEOUT_S = 120.0


def _eventually(attempt: Callable[[], object], process: subprocess.Popen, what: str):
    """attempt()'s first result that does not raise a client or gRPC error, while `up` runs."""
    deadline = time.monotonic() + RESTART_TIMEOUT_S
    while True:
        assert process.poll() is None, f"up exited with {process.returncode} while waiting for {what}"
        try:
            return attempt()
        except (errors.OpenLoRAError, grpc.RpcError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def _generate(fields: dict, adapter: str) -> str:
    with Client(fields["inference"], fields["key"]) as client:
        return client.complete(PROMPT, adapter=adapter, max_tokens=4)


def _adapter_names(fields: dict) -> list[str]:
    with AdminClient(fields["admin"], fields["key"], timeout_s=5) as admin:
        return [adapter.name for adapter in admin.list_adapters(tenant="demo")]


def _requests_of(fields: dict, adapter: str) -> int:
    with AdminClient(fields["admin"], fields["key"], timeout_s=5) as admin:
        return sum(row.requests for row in admin.get_usage(tenant="demo").rows if row.adapter == adapter)


def _wait_usage_recorded(fields: dict, adapter: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while _eventually(lambda: _requests_of(fields, adapter), process, "usage") == 0:
        assert time.monotonic() < deadline, f"the usage of a request on {adapter} was never recorded"
        time.sleep(0.5)


def _control_planes(up: psutil.Process) -> list[psutil.Process]:
    return [p for p in up.children() if "control-plane" in p.cmdline() and p.status() != psutil.STATUS_ZOMBIE]


def _postmasters(up: psutil.Process) -> list[psutil.Process]:
    return [
        p
        for p in up.children()
        if p.status() != psutil.STATUS_ZOMBIE and Path(p.cmdline()[0]).name == "postgres"
    ]


def _port_of(server: psutil.Process, flag: str) -> str:
    argv = server.cmdline()
    return argv[argv.index(flag) + 1]


def test_up_restarts_a_killed_control_plane_on_its_port_and_keeps_serving(
    database_url, redis_url, e2e_model_dir, tmp_path
):
    flags = ("--database-url", database_url, "--redis-url", redis_url)
    with running_up(tmp_path, e2e_model_dir, *flags) as (process, fields):
        up = psutil.Process(process.pid)
        assert _generate(fields, "ad0")
        (killed,) = _control_planes(up)
        (worker,) = worker_children(up)
        killed.kill()
        killed.wait(30)

        # The worker serves on (cached keys) or again once the control plane is back.
        assert _eventually(lambda: _generate(fields, "ad0"), process, "a Generate after the kill")
        assert "ad0" in _eventually(lambda: _adapter_names(fields), process, "the admin API on its port")
        (restarted,) = _control_planes(up)
        assert restarted.pid != killed.pid
        assert f"--listen {fields['admin']}" in " ".join(restarted.cmdline())
        assert worker_children(up) == [worker], "the worker was restarted with the control plane"

        assert _eventually(lambda: _generate(fields, "ad3"), process, "a Generate after the restart")
        _wait_usage_recorded(fields, "ad3", process)
        assert process.poll() is None
    log = (tmp_path / "up.log").read_text(errors="replace")
    assert "control plane exited (signal SIGKILL)" in log, log[-3000:]


def _redis_servers(up: psutil.Process) -> list[psutil.Process]:
    return [p for p in up.children() if p.status() != psutil.STATUS_ZOMBIE and p.name() == "redis-server"]


def _listening_port(server: psutil.Process) -> int | None:
    """redis-server rewrites its command line (its title), so its port is read from its socket."""
    ports = {c.laddr.port for c in server.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    return ports.pop() if len(ports) == 1 else None


def test_up_restarts_killed_embedded_servers_on_their_ports_and_data(e2e_model_dir, tmp_path):
    with running_up(tmp_path, e2e_model_dir) as (process, fields):
        up = psutil.Process(process.pid)
        assert _generate(fields, "ad0")
        (killed,) = _postmasters(up)
        port = _port_of(killed, "-p")
        killed.kill()
        killed.wait(30)

        # The same database (the demo adapters are still there) is served again on the same port.
        assert "ad0" in _eventually(lambda: _adapter_names(fields), process, "the database back")
        (restarted,) = _postmasters(up)
        assert restarted.pid != killed.pid and _port_of(restarted, "-p") == port
        assert _eventually(lambda: _generate(fields, "ad3"), process, "a Generate after the restart")
        _wait_usage_recorded(fields, "ad3", process)

        (killed,) = _redis_servers(up)
        port = _listening_port(killed)
        killed.kill()
        killed.wait(30)
        deadline = time.monotonic() + RESTART_TIMEOUT_S
        while (
            not (_redis_servers(up) and _listening_port(_redis_servers(up)[0]))
            and time.monotonic() < deadline
        ):
            time.sleep(0.2)
        (restarted,) = _redis_servers(up)
        assert restarted.pid != killed.pid and _listening_port(restarted) == port
        assert _eventually(lambda: _generate(fields, "ad4"), process, "a Generate after Redis restarted")
        _wait_usage_recorded(fields, "ad4", process)
    log = (tmp_path / "up.log").read_text(errors="replace")
    assert "postgres exited (signal SIGKILL)" in log and "redis exited (signal SIGKILL)" in log, log[-3000:]
