"""A control plane and a worker serving the OpenAI-compatible API on loopback (tests/worker's system:
real PostgreSQL, Redis, engine on the tiny model, PEFT adapters), and clients for it."""

from __future__ import annotations

import importlib.util
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

_path = Path(__file__).resolve().parents[1] / "worker" / "conftest.py"
_spec = importlib.util.spec_from_file_location("openai_worker_conftest", _path)
worker_conftest = importlib.util.module_from_spec(_spec)
sys.modules["openai_worker_conftest"] = worker_conftest
_spec.loader.exec_module(worker_conftest)

# The worker tests' fixtures, shared: one control plane per module with the tiny model's adapters.
system = worker_conftest.system
tiny_model_dir = worker_conftest.tiny_model_dir
support = worker_conftest.support
BASE_MODEL = worker_conftest.BASE_MODEL
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"


@dataclass
class HttpWorker:
    worker: object

    @property
    def base_url(self) -> str:
        return self.worker.openai_base_url

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.worker.port}"


def start_http_worker(system, state_dir: Path, model_dir: Path | None = None, **overrides) -> HttpWorker:
    worker = worker_conftest.start_worker(
        system.loop,
        system.control_plane.target,
        model_dir or system.model_dir,
        state_dir,
        None,
        http_listen="127.0.0.1:0",
        **overrides,
    )
    return HttpWorker(worker)


@pytest.fixture(scope="module")
def chat_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with a chat template in tokenizer_config.json (the same weights and adapters)."""
    out = tmp_path_factory.mktemp("tiny-chat")
    for item in tiny_model_dir.iterdir():
        (out / item.name).symlink_to(item)
    (out / "tokenizer_config.json").write_text(
        __import__("json").dumps({"chat_template": CHAT_TEMPLATE, "bos_token": "", "eos_token": ""})
    )
    return out


@pytest.fixture(scope="module")
def http_worker(system, chat_model_dir, tmp_path_factory):
    """A worker with the OpenAI-compatible API on the system's control plane, its model with a chat
    template."""
    running = start_http_worker(system, tmp_path_factory.mktemp("http-worker"), chat_model_dir)
    yield running
    system.loop.run(running.worker.stop(1.0))


@pytest.fixture(scope="module")
def tenant(system):
    """(tenant name, key id, secret) of a fresh tenant."""
    return system.new_tenant()


class EnginePause:
    """Holds a worker's engine between steps: while paused, a step does nothing unless `step()` allowed
    it (new requests still enter its queue), so what runs and what waits stays as it is."""

    def __init__(self, worker) -> None:
        import threading

        self._engine = worker.engine.engine
        self._step = self._engine.step
        self._lock = threading.Lock()
        self._paused = False
        self._allowed = 0

        def step():
            with self._lock:
                run = not self._paused or self._allowed > 0
                if self._paused and run:
                    self._allowed -= 1
            if run:
                return self._step()
            time.sleep(0.005)
            return []

        self._engine.step = step

    def pause(self) -> None:
        """From the next step on (a step running now finishes)."""
        with self._lock:
            self._paused, self._allowed = True, 0

    def step(self, num_steps: int = 1) -> None:
        """Lets `num_steps` real steps run while paused, and returns when they have."""
        with self._lock:
            self._allowed += num_steps
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with self._lock:
                if self._allowed == 0:
                    return
            time.sleep(0.005)
        raise AssertionError("the engine did not step")

    def resume(self) -> None:
        with self._lock:
            self._paused = False

    def restore(self) -> None:
        self.resume()
        self._engine.step = self._step
