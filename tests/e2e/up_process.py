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

support = sys.modules["worker_test_support"]  # loaded by this directory's conftest, or by the importer


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
    shutil.copytree(e2e_model_dir, demo_model, dirs_exist_ok=True)  # there already when up is started again
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
    """`openlora up` on the tiny model as its demo model; yields the process and its ready line's fields,
    then stops it (SIGTERM) and expects exit 0. Its log (stderr) is tmp_path/up.log; `env` adds to its
    environment. Started again when a port up picked was taken before its child bound it (`start_up`)."""
    argv, env = up_command(tmp_path, e2e_model_dir, *flags, env=env)
    process, fields = support.retry_on_taken_port(lambda: start_up(argv, env, tmp_path / "up.log"))
    with stopping_up(process):
        yield process, fields


def start_up(
    argv: list[str], env: dict[str, str], log_path: Path, timeout_s: float = 180.0
) -> tuple[subprocess.Popen, dict[str, str]]:
    """Starts `openlora up` (`up_command`'s argv and env) with its log (stderr) in `log_path`, written anew,
    and waits for its ready line; returns the process and the line's fields. When up exits first, or its
    log says that a child of it could not listen (up would start that child again on the same port for as
    long as the port stays taken), or the wait times out, up is stopped and RuntimeError carries its log:
    an error that says a port was taken when one was (`support.retry_on_taken_port`)."""
    with open(log_path, "wb") as up_log:
        process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=up_log, cwd=REPO_ROOT)
    try:
        line = _ready_line(process, log_path, timeout_s)
    except BaseException:
        stop_up(process)
        raise
    return process, dict(part.split("=", 1) for part in line.split()[1:])


def _ready_line(process: subprocess.Popen, log_path: Path, timeout_s: float) -> str:
    """The ready line, given up on once the log says a child could not listen; RuntimeError with the log."""
    try:
        return _read_ready_line(
            process, timeout_s, give_up=lambda: support.PORT_TAKEN in log_path.read_text(errors="replace")
        )
    except AssertionError as error:
        raise RuntimeError(f"{error}\nits log:\n{log_path.read_text(errors='replace')[-4000:]}") from None


def stop_up(process: subprocess.Popen) -> None:
    """Stops `up` as an operator does (SIGTERM: it stops its children first); kills it after 120 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def stopping_up(process: subprocess.Popen) -> Iterator[None]:
    """At the end of the block, `up` is stopped (SIGTERM) and expected to exit 0; killed when the block
    raised."""
    try:
        yield
        process.send_signal(signal.SIGTERM)
        assert process.wait(120) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def worker_children(up: psutil.Process) -> list[psutil.Process]:
    """The live worker processes `up` started."""
    return [p for p in up.children() if "worker" in p.cmdline() and p.status() != psutil.STATUS_ZOMBIE]
