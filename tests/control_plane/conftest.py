"""Fixtures of the control-plane tests: real PEFT adapters for a tiny Llama, and an in-process control
plane (its own event loop in a background thread) on 127.0.0.1 over a fresh database; the worker tests'
support module (servers started again when a port picked free was taken) as `support`."""

from __future__ import annotations

import asyncio
import shutil
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from control_plane.config import ControlPlaneConfig
from control_plane.server.server import RunningControlPlane, serve
from openlora.admin_client import AdminClient
from openlora.base_model import BaseModelSpec
from openlora.v1 import worker_pb2, worker_pb2_grpc
from openlora.wire import spec_to_proto

support = sys.modules["worker_test_support"]  # loaded by tests/conftest.py

WORKER_TOKEN = "test-worker-token-0123456789"
BASE_MODEL = "tiny-llama"


def tiny_llama_dict(num_layers: int = 2) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 128,
    }


def write_peft_adapter(out: Path, seed: int, rank: int, targets: list[str], num_layers: int = 2) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**tiny_llama_dict(num_layers)))
    peft_model = get_peft_model(
        model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
    )
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def base_spec() -> BaseModelSpec:
    return BaseModelSpec.from_hf_config(tiny_llama_dict(), BASE_MODEL)


@pytest.fixture(scope="session")
def adapters_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real PEFT adapters written by `peft` for the tiny Llama, and one for a 3-layer variant."""
    root = tmp_path_factory.mktemp("peft")
    write_peft_adapter(root / "a", seed=1, rank=8, targets=["q_proj", "v_proj", "down_proj"])
    write_peft_adapter(root / "b", seed=2, rank=4, targets=["q_proj", "k_proj", "o_proj", "up_proj"])
    write_peft_adapter(root / "deep", seed=3, rank=4, targets=["q_proj"], num_layers=3)
    return root


@pytest.fixture
def adapter_copy(adapters_root: Path, tmp_path: Path):
    """adapter_copy("a") -> a private copy of a fixture adapter to edit."""

    def copy(name: str) -> Path:
        dst = tmp_path / f"copy-{name}"
        shutil.copytree(adapters_root / name, dst)
        return dst

    return copy


class ServerThread:
    """Runs `serve(config)` on an event loop in a daemon thread, for synchronous tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(120)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@dataclass
class ControlPlaneHandle:
    running: RunningControlPlane
    config: ControlPlaneConfig
    admin_key: str

    @property
    def target(self) -> str:
        return self.running.target

    def admin(self, key: str | None = None) -> AdminClient:
        return AdminClient(self.target, key or self.admin_key)

    def worker_stub(self) -> worker_pb2_grpc.WorkerServiceStub:
        return worker_pb2_grpc.WorkerServiceStub(grpc.insecure_channel(self.target))

    @staticmethod
    def worker_metadata(token: str = WORKER_TOKEN) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {token}"),)


def make_config(database_url: str, state_dir: Path, redis_url: str | None, **overrides) -> ControlPlaneConfig:
    fields = {
        "database_url": database_url,
        "state_dir": state_dir,
        "worker_token": WORKER_TOKEN,
        "listen": "127.0.0.1:0",
        "redis_url": redis_url,
        "grace_period_s": 0.5,
        **overrides,
    }
    return ControlPlaneConfig(**fields)


@pytest.fixture(scope="module")
def server_thread() -> Iterator[ServerThread]:
    thread = ServerThread()
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def cp(
    database_url: str,
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
    server_thread: ServerThread,
    base_spec: BaseModelSpec,
) -> Iterator[ControlPlaneHandle]:
    """A running control plane over this module's fresh database, with the tiny base model registered."""
    config = make_config(database_url, tmp_path_factory.mktemp("cp-state"), redis_url)
    running = server_thread.run(serve(config))
    handle = ControlPlaneHandle(running, config, running.admin_key)
    register_worker(handle, base_spec, worker_id="fixture-worker")
    yield handle
    server_thread.run(running.stop(0))


def register_worker(
    cp: ControlPlaneHandle,
    spec: BaseModelSpec,
    worker_id: str = "",
    address: str = "127.0.0.1:9",
    max_lora_rank: int = 64,
    instance_id: str = "",
) -> worker_pb2.RegisterWorkerResponse:
    return cp.worker_stub().RegisterWorker(
        worker_pb2.RegisterWorkerRequest(
            worker_id=worker_id,
            address=address,
            base_model=spec_to_proto(spec),
            max_lora_rank=max_lora_rank,
            num_adapter_slots=8,
            instance_id=instance_id,
        ),
        metadata=cp.worker_metadata(),
    )
