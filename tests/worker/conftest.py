"""An in-process control plane (real Postgres and Redis) and worker (real engine on a tiny model)."""

from __future__ import annotations

import contextlib
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from openlora.cache_scope import cache_key, cache_scope

support = sys.modules["worker_test_support"]  # loaded by tests/conftest.py

WORKER_TOKEN = "worker-token-" + "w" * 24
ADMIN_KEY = "operator-key-" + "k" * 24
BASE_MODEL = "tiny"
PUBLISHER = "publisher"
AUTH_TTL_S = 0.3


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return support.write_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@dataclass
class System:
    loop: object
    control_plane: object
    worker: object
    admin: object
    model_dir: Path
    cp_state_dir: Path
    adapters: dict[str, str] = field(default_factory=dict)  # public adapter name -> sha256
    tenant_ids: dict[str, str] = field(default_factory=dict)  # tenant name -> id

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.worker.port}"

    def new_tenant(self, admin: bool = False) -> tuple[str, str, str]:
        """A fresh tenant with one key: (tenant name, key id, secret)."""
        name = f"t{uuid.uuid4().hex[:10]}"
        self.tenant_ids[name] = self.admin.create_tenant(name)
        key_id, secret = self.admin.create_key(name, admin=admin)
        return name, key_id, secret

    def private_cache_key(self, tenant: str, sha256: str) -> str:
        """The key workers cache `tenant`'s private adapter of content `sha256` under."""
        return cache_key(sha256, cache_scope(self.tenant_ids[tenant], private=True))

    @contextlib.contextmanager
    def wider_worker(self, max_lora_rank: int):
        """While the block runs, the fleet holds another live worker of this base model accepting
        `max_lora_rank` (a registry row only: no process serves behind it)."""
        from sqlalchemy import delete

        from control_plane.workers.models import Worker

        sessions = self.control_plane.app.sessions
        worker_id = f"wider-{uuid.uuid4().hex[:8]}"
        with sessions.begin() as s:
            s.add(
                Worker(
                    id=worker_id,
                    address="127.0.0.1:1",
                    base_model_name=BASE_MODEL,
                    max_lora_rank=max_lora_rank,
                    num_adapter_slots=4,
                )
            )
        try:
            yield
        finally:
            with sessions.begin() as s:
                s.execute(delete(Worker).where(Worker.id == worker_id))

    def flush_usage(self) -> None:
        self.loop.run(self.worker.usage.flush())

    def wait_usage(self, tenant: str, num_requests: int, timeout_s: float = 20.0):
        deadline = time.monotonic() + timeout_s
        while True:
            usage = self.admin.usage(tenant)
            if usage.total_requests >= num_requests or time.monotonic() > deadline:
                return usage
            time.sleep(0.1)


def _config(cp_target: str, model_dir: Path, state_dir: Path, redis_url: str | None, **overrides):
    from data_plane.server.config import EngineSettings, WorkerConfig

    overrides.setdefault("auth_cache_ttl_s", AUTH_TTL_S)
    overrides.setdefault("listen", "127.0.0.1:0")
    # In-process workers keep the engine loop on a thread, where tests reach its internals (faults,
    # held steps, the scheduler); tests/worker/test_engine_core.py serves through the engine core process,
    # as `openlora worker` does by default (and the e2e tests through `up`).
    overrides.setdefault("engine_core", "thread")
    engine = overrides.pop("engine", EngineSettings(num_kv_blocks=256, max_num_seqs=16, max_lora_rank=16))
    return WorkerConfig(
        model_dir=model_dir,
        model_name=BASE_MODEL,
        control_plane_target=cp_target,
        worker_token=WORKER_TOKEN,
        state_dir=state_dir,
        engine=engine,
        redis_url=redis_url,
        usage_flush_interval_s=0.2,
        drain_grace_s=5.0,
        **overrides,
    )


def worker_config(system, state_dir: Path, redis_url: str | None = None, **overrides):
    """The config `start_worker` starts a worker of the module's system with."""
    return _config(system.control_plane.target, system.model_dir, state_dir, redis_url, **overrides)


def start_worker(loop, cp_target: str, model_dir: Path, state_dir: Path, redis_url: str | None, **overrides):
    from data_plane.server.main import serve_worker

    return loop.run(serve_worker(_config(cp_target, model_dir, state_dir, redis_url, **overrides)))


def start_worker_serving_metrics(
    loop, cp_target: str, model_dir: Path, state_dir: Path, redis_url: str | None, **overrides
):
    """`start_worker` with /metrics on a port picked free, picked again when something took it before the
    worker bound it (another process's server, an outgoing connection's ephemeral port)."""
    return support.retry_on_taken_port(
        lambda: start_worker(
            loop, cp_target, model_dir, state_dir, redis_url, metrics_port=support.free_port(), **overrides
        )
    )


@pytest.fixture(scope="module")
def system(database_url, redis_url, tiny_model_dir, tmp_path_factory):
    from control_plane.config import ControlPlaneConfig
    from control_plane.server.server import serve

    loop = support.LoopThread()
    cp_state = tmp_path_factory.mktemp("cp-state")
    cp = loop.run(
        serve(
            ControlPlaneConfig(
                database_url=database_url,
                state_dir=cp_state,
                worker_token=WORKER_TOKEN,
                listen="127.0.0.1:0",
                redis_url=redis_url,
                admin_key=ADMIN_KEY,
                authorize_cache_ttl_ms=int(AUTH_TTL_S * 1000),
            )
        )
    )
    worker = start_worker(loop, cp.target, tiny_model_dir, tmp_path_factory.mktemp("worker-state"), redis_url)
    admin = support.Admin(cp.target, ADMIN_KEY)
    admin.create_tenant(PUBLISHER)
    system = System(loop, cp, worker, admin, tiny_model_dir, cp_state)
    for name in support.ADAPTER_NAMES:
        sha = admin.push(tiny_model_dir / "adapters" / name, name, PUBLISHER, BASE_MODEL, public=True)
        system.adapters[name] = sha
    yield system
    admin.close()
    loop.run(worker.stop(1.0))
    loop.run(cp.stop(1.0))
    loop.close()


@pytest.fixture
def small_worker(system, tmp_path):
    """A second worker on the same control plane that runs one sequence and lets one wait."""
    from data_plane.server.config import EngineSettings

    engine = EngineSettings(num_kv_blocks=64, max_num_seqs=1, max_lora_rank=16)
    worker = start_worker(
        system.loop,
        system.control_plane.target,
        system.model_dir,
        tmp_path,
        None,
        engine=engine,
        max_waiting=1,
    )
    yield worker
    system.loop.run(worker.stop(1.0))


@pytest.fixture
def spare_worker(system, tmp_path):
    """A second ordinary worker on the same control plane, for tests that stop it."""
    worker = start_worker(system.loop, system.control_plane.target, system.model_dir, tmp_path, None)
    yield worker
    system.loop.run(worker.stop(1.0))


@pytest.fixture
def hinted_worker(system, tmp_path, redis_url):
    """A worker with the longest authorisation cache (10 s) that listens to Redis hints and serves metrics."""
    worker = start_worker_serving_metrics(
        system.loop, system.control_plane.target, system.model_dir, tmp_path, redis_url, auth_cache_ttl_s=10.0
    )
    yield worker
    system.loop.run(worker.stop(1.0))


@pytest.fixture
def make_worker(system, tmp_path):
    """Starts extra workers on the system's control plane (`make_worker(redis_url, **config)`), each with
    its own state dir; all are stopped after the test."""
    started = []

    def make(redis_url: str | None = None, **overrides):
        state_dir = tmp_path / f"worker-{len(started)}"
        worker = start_worker(
            system.loop, system.control_plane.target, system.model_dir, state_dir, redis_url, **overrides
        )
        started.append(worker)
        return worker

    yield make
    for worker in started:
        system.loop.run(worker.stop(1.0))
