"""A worker answers from the moment it listens: while it registers (the control plane, or its database,
down at start) health is NOT_SERVING and Generate is UNAVAILABLE, instead of a port that takes connections
and never speaks HTTP/2 (probes and callers hung to their deadlines)."""

from __future__ import annotations

import asyncio
import socket
import time
from concurrent.futures import Future

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from openlora.v1 import inference_pb2, inference_pb2_grpc

from . import support
from .conftest import BASE_MODEL, WORKER_TOKEN


def test_a_worker_that_cannot_register_yet_answers_not_serving_and_unavailable(tiny_model_dir, tmp_path):
    loop = support.LoopThread()
    try:
        port, starting, status = support.retry_on_taken_port(lambda: _start(loop, tiny_model_dir, tmp_path))
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            try:
                list(stub.Generate(inference_pb2.GenerateRequest(prompt="hi"), timeout=5))
                raise AssertionError("a starting worker served a call")
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
                assert "starting" in error.details()
        assert not starting.done()  # still retrying its registration
        starting.cancel()
        loop.run(asyncio.sleep(0.5))  # its cancellation stops the server and the engine
    finally:
        loop.close()


def _start(loop: support.LoopThread, model_dir, tmp_path) -> tuple[int, Future, int | None]:
    """A worker starting in `loop` on a port picked free, with no control plane to register with: (its
    port, its start, the first health status it answered there; None when it never did). Its start's
    ListenError when that port was taken before it bound it."""
    from data_plane.server.config import EngineSettings, WorkerConfig
    from data_plane.server.main import serve_worker

    port = support.free_port()
    config = WorkerConfig(
        model_dir=model_dir,
        model_name=BASE_MODEL,
        control_plane_target=f"127.0.0.1:{support.free_port()}",  # nothing listens there
        worker_token=WORKER_TOKEN,
        state_dir=tmp_path / "worker",
        listen=f"127.0.0.1:{port}",
        engine=EngineSettings(num_kv_blocks=64, max_num_seqs=4, max_lora_rank=16),
    )
    starting = asyncio.run_coroutine_threadsafe(serve_worker(config), loop.loop)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(600):  # the engine builds first (seconds); then the port answers
            if starting.done():
                starting.result()
            try:
                return port, starting, health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
            except grpc.RpcError as error:
                assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                time.sleep(0.1)
    return port, starting, None


def test_a_worker_whose_metrics_port_is_taken_stops_its_engine_and_a_stopped_one_frees_that_port(
    system, tmp_path
):
    """A start that fails once the engine runs (here: the metrics port another socket holds) stops the
    engine and the gRPC server it began, so a test or a supervisor in the same process can start again;
    and a worker stopped frees its metrics port (the Prometheus server used to outlive it)."""
    from data_plane.server.main import build_engine, serve_worker
    from openlora.listen import ListenError

    from .conftest import start_worker_serving_metrics, worker_config

    with socket.create_server(("0.0.0.0", 0)) as held:
        config = worker_config(system, tmp_path / "taken", metrics_port=held.getsockname()[1])
        engine = build_engine(config)
        with pytest.raises(ListenError, match="--metrics-port"):
            system.loop.run(serve_worker(config, engine))
        assert not engine.is_running

    worker = start_worker_serving_metrics(
        system.loop, system.control_plane.target, system.model_dir, tmp_path / "free", None
    )
    system.loop.run(worker.stop(1.0))
    with socket.create_server(("0.0.0.0", worker.config.metrics_port)):  # bound again: nothing holds it
        pass
