"""`openlora up` supervises its worker: a worker killed with SIGKILL is started again, the new one serves,
the rest of the system stays up, and SIGTERM still stops everything cleanly."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from openlora import errors
from openlora.client import Client
from tests.e2e.test_up import PROMPT, REPO_ROOT, _read_ready_line

pytestmark = pytest.mark.slow


def _worker_children(up: psutil.Process) -> list[psutil.Process]:
    return [p for p in up.children() if "worker" in p.cmdline() and p.status() != psutil.STATUS_ZOMBIE]


def test_up_restarts_a_killed_worker_and_the_new_one_serves(database_url, redis_url, e2e_model_dir, tmp_path):
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO_ROOT),
        OPENLORA_CONTEXT=str(tmp_path / "context.json"),
        XDG_CONFIG_HOME=str(tmp_path / "config"),
    )
    demo_model = tmp_path / "state" / "demo-model"
    shutil.copytree(e2e_model_dir, demo_model)
    (demo_model / ".complete").write_text("ok\n")
    argv = [
        sys.executable, "-m", "openlora.cli", "up",
        "--state-dir", str(tmp_path / "state"),
        "--database-url", database_url,
        "--redis-url", redis_url,
        "--port", "0", "--admin-port", "0",
        "--drain-grace-s", "2",
        "--worker-arg=--num-kv-blocks=64", "--worker-arg=--max-lora-rank=16",
    ]  # fmt: skip
    process = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO_ROOT
    )
    try:
        fields = dict(part.split("=", 1) for part in _read_ready_line(process, timeout_s=180).split()[1:])
        up = psutil.Process(process.pid)
        control_plane = [p for p in up.children() if "control-plane" in p.cmdline()]
        (killed,) = _worker_children(up)
        killed.kill()
        killed.wait(30)

        deadline = time.monotonic() + 120
        text = None
        while text is None and time.monotonic() < deadline and process.poll() is None:
            try:
                with Client(fields["inference"], fields["key"]) as client:
                    text = client.complete(PROMPT, adapter="ad0", max_tokens=4)
            except errors.OpenLoRAError:  # the new worker is not serving yet
                time.sleep(0.3)
        assert text, "no worker served a Generate after the kill"
        (restarted,) = _worker_children(up)
        assert restarted.pid != killed.pid
        assert process.poll() is None and all(p.is_running() for p in control_plane)

        process.send_signal(signal.SIGTERM)
        assert process.wait(120) == 0
        assert not restarted.is_running() or restarted.status() == psutil.STATUS_ZOMBIE
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
