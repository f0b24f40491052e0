"""A worker process no single request can break: one tenant's extreme but valid request fails alone with
INVALID_ARGUMENT (or succeeds) while another tenant's stream completes; a worker whose engine cannot go on
turns NOT_SERVING and exits non-zero, for its supervisor to restart it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import load_file, save_file

from data_plane.server.main import ENGINE_DEAD_EXIT_CODE
from openlora import errors
from openlora.client import Client

pytestmark = pytest.mark.slow
support = sys.modules["worker_test_support"]  # loaded by this directory's conftest
REPO_ROOT = Path(__file__).resolve().parents[2]
SMALLEST_FLOAT32 = 1e-45  # the smallest positive float32 (the protocol carries sampling values as float)
# Loaded at start-up by the worker process under test: its first forward pass raises a fatal fault.
FATAL_FAULT = """
import torch
from data_plane.engine.model_runner import ModelRunner

def _run(self, *args, **kwargs):
    raise torch.cuda.OutOfMemoryError("injected by the test: device out of memory")

ModelRunner.run = _run
"""


def _tenant(admin) -> tuple[str, str]:
    name = f"h{uuid.uuid4().hex[:10]}"
    admin.create_tenant(name)
    return name, admin.create_key(name)[1]


def _huge_alpha_adapter(source: Path, out: Path) -> Path:
    """A copy of `source` whose B factors are times 1e30 in float32: finite and accepted, but its deltas
    overflow float32 (an alpha that large is refused at upload)."""
    shutil.copytree(source, out)
    weights = out / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v.float() * (1e30 if "lora_B" in k else 1.0) for k, v in tensors.items()}, weights)
    return out


def test_extreme_valid_request_fails_alone_and_another_tenants_stream_completes(
    control_plane, spawn_worker, e2e_model_dir, tmp_path
):
    _, admin = control_plane
    worker = spawn_worker()  # registers the base model, which uploads name
    hostile, hostile_key = _tenant(admin)
    other, other_key = _tenant(admin)
    huge = _huge_alpha_adapter(e2e_model_dir / "adapters" / "ad0", tmp_path / "huge")
    admin.push(huge, "huge", hostile, "tiny")
    admin.push(e2e_model_dir / "adapters" / "ad1", "ad1", other, "tiny")

    outcome: dict = {"tokens": 0, "finish": None, "error": None}
    started = threading.Event()

    def stream() -> None:
        try:
            with Client(worker.target, other_key) as client:
                for response in client.generate_stream("hello world", adapter="ad1", max_tokens=200):
                    outcome["tokens"] += len(response.token_ids)
                    started.set()
                    outcome["finish"] = response.finish_reason or outcome["finish"]
        except errors.OpenLoRAError as error:
            outcome["error"] = error
        finally:
            started.set()

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    assert started.wait(60)
    with Client(worker.target, hostile_key) as client:
        with pytest.raises(errors.InvalidArgument) as refused:
            client.complete("hello world", adapter="huge", temperature=1.0, max_tokens=8)
        assert "adapter" in str(refused.value) and "non-finite" in str(refused.value)
        # Named by the field the caller used: a one-member mix of weight 1 runs as that adapter.
        with pytest.raises(errors.InvalidArgument) as refused:
            client.complete("hello world", mix=[("huge", 1.0)], temperature=1.0, max_tokens=8)
        assert "mix: produced non-finite logits" in str(refused.value)
        # Temperature and penalty just above zero are accepted, and now served.
        for sampling in (
            dict(temperature=SMALLEST_FLOAT32),
            dict(temperature=1.0, repetition_penalty=SMALLEST_FLOAT32),
        ):
            tokens = sum(len(r.token_ids) for r in client.generate_stream("hello", max_tokens=5, **sampling))
            assert tokens == 5, sampling
    thread.join(120)
    assert outcome["error"] is None, outcome["error"]
    assert outcome["tokens"] == 200 and outcome["finish"] != 0
    with grpc.insecure_channel(worker.target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_worker_whose_engine_cannot_go_on_turns_not_serving_then_exits_non_zero(
    control_plane, e2e_model_dir, tmp_path
):
    cp, admin = control_plane
    _, key = _tenant(admin)
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(FATAL_FAULT)
    env = dict(os.environ, PYTHONPATH=f"{inject}{os.pathsep}{REPO_ROOT}")
    log_path = tmp_path / "worker.log"

    def start() -> tuple[subprocess.Popen, str]:
        target = f"127.0.0.1:{support.free_port()}"
        argv = [
            sys.executable, "-m", "openlora.cli", "worker",
            "--listen", target,
            "--control-plane", cp.target,
            "--worker-token", cp.app.config.worker_token,
            "--model", str(e2e_model_dir),
            "--model-name", "tiny",
            "--state-dir", str(tmp_path / "state"),
            "--num-kv-blocks", "64",
            "--max-lora-rank", "16",
            "--drain-grace-s", "5",
        ]  # fmt: skip
        with open(log_path, "ab") as log:
            process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        try:
            support.wait_health(target, process=process)
        except BaseException:
            process.kill()
            process.wait()
            raise
        return process, target

    process, target = support.start_retrying_taken_ports(start, log_path)
    try:
        statuses: list[int] = []
        watching = threading.Event()

        def watch() -> None:
            with grpc.insecure_channel(target) as channel:
                try:
                    for response in health_pb2_grpc.HealthStub(channel).Watch(
                        health_pb2.HealthCheckRequest()
                    ):
                        statuses.append(response.status)
                        watching.set()
                except grpc.RpcError:
                    pass  # the server stopped
                finally:
                    watching.set()

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        assert watching.wait(30)
        with Client(target, key) as client, pytest.raises(errors.Unavailable):
            client.complete("hello", max_tokens=4)
        assert process.wait(60) == ENGINE_DEAD_EXIT_CODE, log_path.read_text()[-3000:]
        watcher.join(30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert statuses[0] == health_pb2.HealthCheckResponse.SERVING
    assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses, statuses
