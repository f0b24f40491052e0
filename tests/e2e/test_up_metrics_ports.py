"""Metrics ports: under `openlora up`, OPENLORA_METRICS_PORT is the worker's /metrics and
--admin-metrics-port the control plane's (both children read OPENLORA_METRICS_PORT, and the second to
bind it crashed); a worker or control plane whose metrics port is taken exits 1 with one line naming the
address and the flag, not a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.test_up import REPO_ROOT
from tests.e2e.up_process import start_up, stopping_up, up_command

pytestmark = pytest.mark.slow
support = sys.modules["worker_test_support"]  # loaded by this directory's conftest
METRICS_FLAG = "--metrics-port (OPENLORA_METRICS_PORT)"


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        return response.read().decode()


def test_under_up_the_metrics_variable_is_the_workers_port_and_the_control_plane_has_its_own(
    database_url, redis_url, e2e_model_dir, tmp_path
):
    def start() -> tuple[subprocess.Popen, int, int]:
        """up on metrics ports picked free; stopped, with an error saying so, when one was taken before
        its child bound it (then started again on others)."""
        worker_port, control_plane_port = support.free_port(), support.free_port()
        flags = ("--database-url", database_url, "--redis-url", redis_url)
        flags += ("--admin-metrics-port", str(control_plane_port))
        env = {"OPENLORA_METRICS_PORT": str(worker_port)}
        process, _ = start_up(*up_command(tmp_path, e2e_model_dir, *flags, env=env), tmp_path / "up.log")
        return process, worker_port, control_plane_port

    process, worker_port, control_plane_port = support.retry_on_taken_port(start)
    with stopping_up(process):
        assert "vllm:num_requests_waiting" in _scrape(worker_port)
        control_plane = _scrape(control_plane_port)
        assert "process_" in control_plane and "vllm:" not in control_plane
        assert process.poll() is None


def _held_port() -> socket.socket:
    return socket.create_server(("0.0.0.0", 0))


def _assert_one_line_naming(result: subprocess.CompletedProcess, address: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot listen on {address}:") and last.endswith(METRICS_FLAG)


def _openlora(*args: str, timeout_s: float = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    env.pop("OPENLORA_METRICS_PORT", None)
    return subprocess.run(
        [sys.executable, "-m", "openlora.cli", *args],
        env=env, capture_output=True, text=True, timeout=timeout_s, cwd=REPO_ROOT,
    )  # fmt: skip


def test_a_worker_whose_metrics_port_is_taken_exits_1_with_one_line(e2e_model_dir, tmp_path: Path):
    with _held_port() as held:
        port = held.getsockname()[1]
        result = _openlora(
            "worker", "--model", str(e2e_model_dir), "--listen", "127.0.0.1:0",
            "--control-plane", "127.0.0.1:9", "--worker-token", "t" * 20,
            "--state-dir", str(tmp_path / "worker"), "--num-kv-blocks", "64", "--max-lora-rank", "16",
            "--metrics-port", str(port),
        )  # fmt: skip
    _assert_one_line_naming(result, f"0.0.0.0:{port}")


def test_a_control_plane_whose_metrics_port_is_taken_exits_1_with_one_line(
    database_url, redis_url, tmp_path: Path
):
    with _held_port() as held:
        port = held.getsockname()[1]
        result = _openlora(
            "control-plane", "--listen", "127.0.0.1:0", "--database-url", database_url,
            "--redis-url", redis_url, "--state-dir", str(tmp_path / "cp"),
            "--worker-token", "w" * 20, "--metrics-port", str(port),
        )  # fmt: skip
    _assert_one_line_naming(result, f"0.0.0.0:{port}")
