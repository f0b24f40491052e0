"""`openlora up` as a test starts it: a subprocess on the tiny e2e model as its demo model, on free ports."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from tests.e2e.test_up import REPO_ROOT, _read_ready_line


def up_command(
    tmp_path: Path, e2e_model_dir: Path, *flags: str, env: dict[str, str] | None = None
) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of `openlora up` with the tiny model as its demo model (copied into the state
    dir under tmp_path) on free ports; `flags` come last, so they may name ports of their own; `env` adds
    to the environment."""
    environment = dict(
        os.environ,
        PYTHONPATH=str(REPO_ROOT),
        OPENLORA_CONTEXT=str(tmp_path / "context.json"),
        XDG_CONFIG_HOME=str(tmp_path / "config"),
        **(env or {}),
    )
    demo_model = tmp_path / "state" / "demo-model"
    shutil.copytree(e2e_model_dir, demo_model)
    (demo_model / ".complete").write_text("ok\n")
    argv = [
        sys.executable, "-m", "openlora.cli", "up",
        "--state-dir", str(tmp_path / "state"),
        "--port", "0", "--admin-port", "0",
        "--drain-grace-s", "2",
        "--worker-arg=--num-kv-blocks=64", "--worker-arg=--max-lora-rank=16",
        *flags,
    ]  # fmt: skip
    return argv, environment


@contextmanager
def running_up(
    tmp_path: Path, e2e_model_dir: Path, *flags: str, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen, dict]]:
    """`openlora up` on the tiny model as its demo model; yields the process and its ready line's fields.
    Its log (stderr) is tmp_path/up.log; `env` adds to its environment."""
    argv, env = up_command(tmp_path, e2e_model_dir, *flags, env=env)
    with open(tmp_path / "up.log", "wb") as up_log:
        process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=up_log, cwd=REPO_ROOT)
    try:
        fields = dict(part.split("=", 1) for part in _read_ready_line(process, timeout_s=180).split()[1:])
        yield process, fields
        process.send_signal(signal.SIGTERM)
        assert process.wait(120) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def worker_children(up: psutil.Process) -> list[psutil.Process]:
    """The live worker processes `up` started."""
    return [p for p in up.children() if "worker" in p.cmdline() and p.status() != psutil.STATUS_ZOMBIE]
