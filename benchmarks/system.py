"""The system under test, started the way a user starts it: `openlora up` as a child process.

`up` brings embedded Postgres and Redis (unless URLs are given), the control plane and one worker on the
benchmark model; this module waits for its `ready` line, then registers adapters through the admin API,
samples the worker's resident memory, and stops everything with SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil

from control_plane.artifacts.slots import MAX_UPLOADS_IN_FLIGHT_PER_TENANT

READY_PREFIX = "ready "


class SystemFailed(RuntimeError):
    """`openlora up` exited or did not become ready."""


@dataclass(frozen=True)
class SystemConfig:
    model_dir: Path
    state_dir: Path
    database_url: str | None = None
    redis_url: str | None = None
    device: str = "cpu"
    tenant: str = "bench"
    # Extra worker flags, e.g. ("--num-adapter-slots=32",).
    worker_args: tuple[str, ...] = ()
    ready_timeout_s: float = 600.0


@dataclass
class RunningSystem:
    config: SystemConfig
    process: subprocess.Popen
    inference_target: str
    admin_target: str
    # Admin + infer key of `config.tenant`.
    api_key: str
    # The operator's admin key (may act for every tenant).
    operator_key: str

    @property
    def base_model(self) -> str:
        return self.config.model_dir.name

    def worker_process(self) -> psutil.Process:
        for child in psutil.Process(self.process.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                cmdline = child.cmdline()
                if "worker" in cmdline and "up" not in cmdline:
                    return child
        raise SystemFailed("no worker process under `openlora up`")

    def admin(self, operator: bool = False):
        from openlora.admin_client import AdminClient

        return AdminClient(self.admin_target, self.operator_key if operator else self.api_key, timeout_s=120)


@contextlib.contextmanager
def start_system(config: SystemConfig) -> Iterator[RunningSystem]:
    """Runs `openlora up` until the block ends; raises SystemFailed with its log tail if it cannot serve."""
    config.state_dir.mkdir(parents=True, exist_ok=True)
    log_path = config.state_dir / "up.log"
    argv = [
        sys.executable, "-m", "openlora.cli", "up",
        "--state-dir", str(config.state_dir),
        "--model", str(config.model_dir),
        "--port", "0", "--admin-port", "0",
        "--device", config.device,
        "--tenant", config.tenant,
        "--context", str(config.state_dir / "context.json"),
        "--drain-grace-s", "10",
        *(f"--worker-arg={arg}" for arg in config.worker_args),
    ]  # fmt: skip
    if config.database_url:
        argv += ["--database-url", config.database_url]
    if config.redis_url:
        argv += ["--redis-url", config.redis_url]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENLORA_")}
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, env=env, text=True
        )
    try:
        line = _wait_ready_line(process, config.ready_timeout_s, log_path)
        fields = dict(part.split("=", 1) for part in line[len(READY_PREFIX) :].split())
        secrets = json.loads((config.state_dir / "up-secrets.json").read_text())
        yield RunningSystem(
            config=config,
            process=process,
            inference_target=fields["inference"],
            admin_target=fields["admin"],
            api_key=fields["key"],
            operator_key=secrets["admin_key"],
        )
    finally:
        _stop(process)


def _wait_ready_line(process: subprocess.Popen, timeout_s: float, log_path: Path) -> str:
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for text in process.stdout:
            lines.put(text.strip())
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            continue
        if line is None:
            break
        if line.startswith(READY_PREFIX):
            return line
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
    raise SystemFailed(f"`openlora up` did not print its ready line (exit code {process.poll()}):\n{tail}")


def _stop(process: subprocess.Popen, timeout_s: float = 90.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def register_adapters(
    system: RunningSystem,
    adapters: Sequence[tuple[str, Path]],
    *,
    tenant: str = "",
    public: bool = False,
    concurrency: int = MAX_UPLOADS_IN_FLIGHT_PER_TENANT,
) -> float:
    """Uploads each (name, directory) through AdminService.UploadAdapter; returns the seconds it took."""
    started = time.perf_counter()
    with system.admin(operator=bool(tenant)) as admin:

        def upload(item: tuple[str, Path]) -> None:
            name, directory = item
            admin.upload_adapter(directory, name, system.base_model, public=public, tenant=tenant)

        with ThreadPoolExecutor(concurrency) as pool:
            for _ in pool.map(upload, adapters):
                pass
    return time.perf_counter() - started


class MemorySampler:
    """Samples a process's resident memory every `interval_s` in a thread while the block runs."""

    def __init__(self, process: psutil.Process, interval_s: float = 0.2) -> None:
        self.process, self.interval_s = process, interval_s
        self.samples_bytes: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.samples_bytes.append(self.process.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(psutil.Error):
            self.samples_bytes.append(self.process.memory_info().rss)

    @property
    def first_bytes(self) -> int:
        return self.samples_bytes[0] if self.samples_bytes else 0

    @property
    def peak_bytes(self) -> int:
        return max(self.samples_bytes, default=0)

    @property
    def last_bytes(self) -> int:
        return self.samples_bytes[-1] if self.samples_bytes else 0
