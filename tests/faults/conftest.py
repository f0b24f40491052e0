"""Fault injection against the real processes: `openlora control-plane` and `openlora worker` as
subprocesses, on a PostgreSQL and a Redis that this suite starts itself (never the machine's own, which a
test here may stop).

- `fault_postgres` (package): one embedded PostgreSQL on a fixed port, so a test can stop it and start it
  again where the control plane finds it.
- `fault_redis` (per test): an embedded Redis a test may stop.
- `fault_system` (per test): a fresh database, a control plane on it, an admin client, and
  `spawn_worker(...)` for workers on the tiny model.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from openlora import errors
from openlora.admin_client import AdminClient
from openlora.client import Client
from openlora.embedded import EmbeddedPostgres, EmbeddedRedis, child_setup, free_port

support = sys.modules["worker_test_support"]  # loaded by tests/conftest.py

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER_TOKEN = "fault-worker-token-" + "w" * 20
ADMIN_KEY = "fault-operator-key-" + "k" * 20
BASE_MODEL = "tiny"
LONG_CONTEXT_TOKENS = 8192


class _Process:
    """A child `openlora` process with its log; `kill()` is SIGKILL, `stop()` SIGTERM then SIGKILL."""

    def __init__(self, argv: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 (the child writes to it until it ends)
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "openlora.cli", *argv],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            preexec_fn=child_setup(None, None, signal.SIGKILL),  # dies with this test process
        )

    def wait_serving(self, target: str) -> None:
        try:
            support.wait_health(target, process=self.process, timeout_s=120)
        except Exception:
            self.kill()
            raise RuntimeError(self.log_tail()) from None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        self._log.close()

    def stop(self, timeout_s: float = 30) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout_s)
        self.kill()

    def log_tail(self, num_chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-num_chars:]


PORT_TAKEN = support.PORT_TAKEN


def _start_listening(
    process: _Process, argv_for: Callable[[str], list[str]], log_path: Path, target: str | None
) -> None:
    """Starts `process` (argv_for(its target)) and waits until it serves: on `target`, or on a port picked
    free, started again on another when that one was taken before the child bound it."""

    def start(listen: str) -> None:
        process.target = listen
        _Process.__init__(process, argv_for(listen), log_path)
        process.wait_serving(listen)

    if target is not None:
        start(target)
    else:
        support.start_retrying_taken_ports(lambda: start(f"127.0.0.1:{free_port()}"), log_path)


class WorkerProcess(_Process):
    def __init__(self, cp_target: str, model_dir: Path, state_dir: Path, log_path: Path, *extra: str) -> None:
        self.state_dir = state_dir
        _start_listening(
            self, lambda target: self._argv(target, cp_target, model_dir, state_dir, extra), log_path, None
        )

    @staticmethod
    def _argv(
        target: str, cp_target: str, model_dir: Path, state_dir: Path, extra: tuple[str, ...]
    ) -> list[str]:
        return [
            "worker",
            "--listen", target,
            "--control-plane", cp_target,
            "--worker-token", WORKER_TOKEN,
            "--model", str(model_dir),
            "--model-name", BASE_MODEL,
            "--state-dir", str(state_dir),
            "--num-kv-blocks", "2048",
            "--max-lora-rank", "16",
            "--drain-grace-s", "5",
            "--max-tokens-limit", str(LONG_CONTEXT_TOKENS),
            *extra,
        ]  # fmt: skip


class ControlPlaneProcess(_Process):
    def __init__(
        self, database_url: str, redis_url: str, state_dir: Path, log_path: Path, target: str | None = None
    ) -> None:
        self.database_url, self.redis_url, self.state_dir = database_url, redis_url, state_dir
        argv_for = lambda listen: [  # noqa: E731
            "control-plane",
            "--listen", listen,
            "--database-url", database_url,
            "--redis-url", redis_url,
            "--state-dir", str(state_dir),
            "--worker-token", WORKER_TOKEN,
            "--admin-key", ADMIN_KEY,
        ]  # fmt: skip
        _start_listening(self, argv_for, log_path, target)


@dataclass
class FaultSystem:
    """A control plane on its own database, its admin client, and the workers a test starts."""

    control_plane: ControlPlaneProcess
    admin: AdminClient
    model_dir: Path
    redis_url: str
    directory: Path
    workers: list[WorkerProcess] = field(default_factory=list)

    def restart_control_plane(self) -> None:
        """SIGKILLs the control plane (when it still runs) and starts it again on the same port, database
        and state directory."""
        old = self.control_plane
        old.kill()
        self.control_plane = ControlPlaneProcess(
            old.database_url, old.redis_url, old.state_dir, old.log_path, target=old.target
        )

    def spawn_worker(self, *extra: str, state_dir: Path | None = None, redis: bool = True) -> WorkerProcess:
        """A worker on the tiny model; `extra` flags are appended (later flags win)."""
        state_dir = state_dir or self.directory / f"worker-{len(self.workers)}"
        args = [*extra, *(["--redis-url", self.redis_url] if redis else [])]
        worker = WorkerProcess(
            self.control_plane.target,
            self.model_dir,
            state_dir,
            self.directory / f"worker-{len(self.workers)}.log",
            *args,
        )
        self.workers.append(worker)
        return worker

    def tenant_with_key(self) -> tuple[str, str]:
        """A new tenant's name and an inference key of it."""
        name = f"f{uuid.uuid4().hex[:10]}"
        self.admin.create_tenant(name)
        return name, self.admin.create_api_key(name).secret

    def wait_usage(self, tenant: str, num_requests: int, timeout_s: float = 60.0):
        """GetUsage of `tenant` once it counts `num_requests` requests (or the last seen at the deadline)."""
        deadline = time.monotonic() + timeout_s
        usage = self.admin.get_usage(tenant)
        while usage.total_requests < num_requests and time.monotonic() < deadline:
            time.sleep(0.2)
            usage = self.admin.get_usage(tenant)
        return usage

    def logs(self) -> str:
        """The tails of every process log, for assertion messages."""
        parts = [f"--- control plane\n{self.control_plane.log_tail()}"]
        parts += [f"--- worker {i}\n{w.log_tail()}" for i, w in enumerate(self.workers)]
        return "\n".join(parts)


@dataclass
class Stream:
    """One Generate stream run in a thread: arrival time and size of every response, and how it ended."""

    tenant: str = ""
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (monotonic s, tokens)
    finish_reason: int = 0  # inference_pb2.FinishReason
    error: errors.OpenLoRAError | None = None
    error_at: float | None = None
    started: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.arrivals)

    def tokens_before(self, at: float) -> int:
        return sum(n for t, n in self.arrivals if t <= at)


def start_stream(target: str, key: str, tenant: str = "", **kwargs) -> Stream:
    """Starts one Generate stream in a daemon thread; returns its `Stream` at once."""
    stream = Stream(tenant=tenant)

    def run() -> None:
        try:
            with Client(target, key) as client:
                for response in client.generate_stream(**kwargs):
                    stream.arrivals.append((time.monotonic(), len(response.token_ids)))
                    stream.started.set()
                    if response.finish_reason:
                        stream.finish_reason = response.finish_reason
        except errors.OpenLoRAError as error:
            stream.error, stream.error_at = error, time.monotonic()
        finally:
            stream.started.set()
            stream.done.set()

    threading.Thread(target=run, daemon=True).start()
    return stream


@pytest.fixture(scope="package")
def fault_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a long context, so that a stream lasts seconds (it makes ~500 tokens/s)."""
    model_dir = support.write_tiny_model(tmp_path_factory.mktemp("fault-model"))
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["max_position_embeddings"] = LONG_CONTEXT_TOKENS
    config_path.write_text(json.dumps(config))
    return model_dir


@pytest.fixture(scope="package")
def fault_postgres() -> Iterator[EmbeddedPostgres]:
    """This suite's own PostgreSQL (a test may stop and restart it on the same port), on a port picked
    free: another one when that was taken before the server bound it."""
    state_dir = Path(tempfile.mkdtemp(prefix="openlora-faults-pg-"))

    def start() -> EmbeddedPostgres:
        server = EmbeddedPostgres(state_dir, port=free_port())
        try:
            server.start()
        except BaseException:
            server.stop()
            raise
        return server

    try:
        server = support.retry_on_taken_port(start)
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture
def fault_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "redis")
    with server:
        yield server


@pytest.fixture
def fault_system(fault_postgres, fault_redis, fault_model_dir, tmp_path) -> Iterator[FaultSystem]:
    if fault_postgres.port is None:  # a test stopped it and failed before starting it again
        fault_postgres.start()
    database = f"faults_{uuid.uuid4().hex[:12]}"
    server_url = fault_postgres.url
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    database_url = server_url.rsplit("/", 1)[0] + f"/{database}"
    control_plane = ControlPlaneProcess(
        database_url, fault_redis.url, tmp_path / "control-plane", tmp_path / "control-plane.log"
    )
    admin = AdminClient(control_plane.target, ADMIN_KEY)
    system = FaultSystem(control_plane, admin, fault_model_dir, fault_redis.url, tmp_path)
    try:
        yield system
    finally:
        admin.close()
        for worker in system.workers:
            worker.kill()
        control_plane.stop()
        if fault_postgres.port is not None:
            with psycopg.connect(fault_postgres.url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
