"""Real worker processes on loopback against a control plane on the real Postgres and Redis."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

support = sys.modules["worker_test_support"]  # loaded by tests/conftest.py

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER_TOKEN = "e2e-worker-token-" + "w" * 20
ADMIN_KEY = "e2e-operator-key-" + "k" * 20
BASE_MODEL = "tiny"


@pytest.fixture(scope="session")
def e2e_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return support.write_tiny_model(tmp_path_factory.mktemp("e2e-model"))


@pytest.fixture(scope="module")
def control_plane(database_url, redis_url, tmp_path_factory):
    """The control plane served in this test process (the worker is the process under test)."""
    from control_plane.config import ControlPlaneConfig
    from control_plane.server.server import serve

    loop = support.LoopThread()
    cp = loop.run(
        serve(
            ControlPlaneConfig(
                database_url=database_url,
                state_dir=tmp_path_factory.mktemp("e2e-cp"),
                worker_token=WORKER_TOKEN,
                listen="127.0.0.1:0",
                redis_url=redis_url,
                admin_key=ADMIN_KEY,
                authorize_cache_ttl_ms=300,
            )
        )
    )
    admin = support.Admin(cp.target, ADMIN_KEY)
    yield cp, admin
    admin.close()
    loop.run(cp.stop(1.0))
    loop.close()


class WorkerProcess:
    def __init__(
        self,
        cp_target: str,
        model_dir: Path,
        state_dir: Path,
        log_path: Path,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.log_path = log_path
        support.start_retrying_taken_ports(
            lambda: self._start(support.free_port(), cp_target, model_dir, state_dir, extra_args), log_path
        )

    def _start(
        self, port: int, cp_target: str, model_dir: Path, state_dir: Path, extra_args: tuple[str, ...]
    ) -> None:
        self.port = port
        self.target = f"127.0.0.1:{port}"
        log_path = self.log_path
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        argv = [
            sys.executable, "-m", "openlora.cli", "worker",
            "--listen", self.target,
            "--control-plane", cp_target,
            "--worker-token", WORKER_TOKEN,
            "--model", str(model_dir),
            "--model-name", BASE_MODEL,
            "--state-dir", str(state_dir),
            "--num-kv-blocks", "256",
            "--max-lora-rank", "16",
            "--auth-cache-ttl-s", "0.3",
            "--drain-grace-s", "30",
            *extra_args,
        ]  # fmt: skip
        self._log = open(log_path, "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            argv, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO_ROOT
        )
        try:
            support.wait_health(self.target, process=self.process)
        except Exception:
            self.kill()
            raise RuntimeError(self.log_path.read_text()[-3000:]) from None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        self._log.close()

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


@pytest.fixture
def spawn_worker(control_plane, e2e_model_dir, tmp_path):
    started: list[WorkerProcess] = []

    def spawn(state_dir: Path | None = None, extra_args: tuple[str, ...] = ()) -> WorkerProcess:
        """A worker process; `extra_args` are more flags (a later flag overrides an earlier one)."""
        worker = WorkerProcess(
            control_plane[0].target,
            e2e_model_dir,
            state_dir or tmp_path / "worker-state",
            tmp_path / f"worker-{len(started)}.log",
            extra_args,
        )
        started.append(worker)
        return worker

    yield spawn
    for worker in started:
        worker.kill()
