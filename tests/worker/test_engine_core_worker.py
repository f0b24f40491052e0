"""A worker serving through its engine core process (`--engine-core process`, the default of `openlora
worker`): the same tokens as the in-process loop, billed once; a drain that waits for a stream held in
the core; a cancelled call aborted in the core and billed for what it delivered; a core that dies turns
the worker NOT_SERVING and its calls UNAVAILABLE; `--engine-core` (process by default) names itself when
refused."""

from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from openlora import errors
from openlora.cli import build_parser
from openlora.client import Client
from openlora.commands.serving import worker_config_from_args
from tests.refused_flags import assert_refused_before_start

from .conftest import start_worker

PROMPT = "the quick brown fox"


@pytest.fixture
def core_worker(system, tmp_path):
    worker = start_worker(
        system.loop, system.control_plane.target, system.model_dir, tmp_path, None, engine_core="process"
    )
    yield worker
    system.loop.run(worker.stop(1.0))


def _core_pid(worker) -> int:
    return worker.engine._process.pid


def _health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status


def _until(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_the_core_serves_the_threads_tokens_and_bills_them_once(system, core_worker):
    tenant, _, key = system.new_tenant()
    adapter = next(iter(system.adapters))
    results = {}
    for name, target in (("thread", system.target), ("process", f"127.0.0.1:{core_worker.port}")):
        with Client(target, key) as client:
            responses = list(client.generate_stream(prompt=PROMPT, adapter=adapter, max_tokens=20))
        results[name] = ([t for r in responses for t in r.token_ids], responses[-1])
    assert results["process"][0] == results["thread"][0]
    assert len(results["process"][0]) == 20
    assert results["process"][1].usage.completion_tokens == 20
    system.loop.run(core_worker.usage.flush())
    system.flush_usage()
    usage = system.wait_usage(tenant, 2)
    assert usage.total_requests == 2 and usage.total_completion_tokens == 40


@pytest.mark.parametrize(
    "method", ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "ensemble"]
)
def test_every_mix_method_serves_through_the_core_as_through_the_thread(system, core_worker, method):
    """A merge is built in the worker's process and served by the core (it once asked the engine for
    its config, which only the in-process loop has: INTERNAL)."""
    _, _, key = system.new_tenant()
    names = list(system.adapters)[:2]
    mix = {names[0]: 0.5, names[1]: 0.5}
    options = {"density": 0.5} if method != "linear" and method != "ensemble" else {}
    tokens = {}
    for arm, target in (("thread", system.target), ("process", f"127.0.0.1:{core_worker.port}")):
        with Client(target, key) as client:
            responses = list(
                client.generate_stream(prompt=PROMPT, max_tokens=8, mix=mix, mix_method=method, **options)
            )
        tokens[arm] = [t for r in responses for t in r.token_ids]
    assert len(tokens["process"]) == 8
    assert tokens["process"] == tokens["thread"]


def test_a_drain_waits_for_a_stream_held_in_the_core(system, core_worker):
    _, _, key = system.new_tenant()
    target = f"127.0.0.1:{core_worker.port}"
    outcome: dict = {"tokens": 0, "error": None}
    first = threading.Event()

    def stream():
        try:
            with Client(target, key) as client:
                for response in client.generate_stream(prompt="hello", max_tokens=200):
                    if not first.is_set():
                        os.kill(_core_pid(core_worker), signal.SIGSTOP)  # held mid-stream
                        first.set()
                    outcome["tokens"] += len(response.token_ids)
        except errors.OpenLoRAError as error:
            outcome["error"] = error
        first.set()

    thread = threading.Thread(target=stream)
    thread.start()
    stopped = threading.Event()
    try:
        assert first.wait(60)
        system.loop.loop.call_soon_threadsafe(
            lambda: system.loop.loop.create_task(core_worker.stop(30.0)).add_done_callback(
                lambda _: stopped.set()
            )
        )
        _until(lambda: _health(target) == health_pb2.HealthCheckResponse.NOT_SERVING)
        assert not stopped.is_set()  # the stream is held in the core: the drain waits for it
        with Client(target, key) as client, pytest.raises(errors.Unavailable) as refused:
            client.complete("hello", max_tokens=2)
        assert "draining" in refused.value.details
    finally:
        os.kill(_core_pid(core_worker), signal.SIGCONT)
    thread.join(60)
    assert stopped.wait(60)
    assert outcome["error"] is None and outcome["tokens"] == 200
    assert not core_worker.engine._process.is_alive()  # stopped with its worker


def test_a_cancelled_call_is_aborted_in_the_core_and_billed_for_what_it_delivered(system, core_worker):
    tenant, _, key = system.new_tenant()
    with Client(f"127.0.0.1:{core_worker.port}", key) as client:
        call = client.generate_stream(prompt="hello", max_tokens=400)
        delivered = len(next(call).token_ids)
        call.close()  # cancels the call on the server
    _until(lambda: core_worker.engine.num_running == 0)
    system.loop.run(core_worker.usage.flush())
    usage = system.wait_usage(tenant, 1)
    assert usage.total_requests == 1
    assert delivered <= usage.total_completion_tokens < 400


def test_a_dead_core_turns_the_worker_not_serving_and_its_calls_unavailable(system, core_worker):
    _, _, key = system.new_tenant()
    target = f"127.0.0.1:{core_worker.port}"
    with Client(target, key) as client:
        call = client.generate_stream(prompt="hello", max_tokens=400)
        next(call)
        os.kill(_core_pid(core_worker), signal.SIGKILL)
        with pytest.raises(errors.Unavailable):
            for _ in call:
                pass
        with pytest.raises(errors.Unavailable):
            client.complete("hello", max_tokens=2)
    _until(lambda: _health(target) == health_pb2.HealthCheckResponse.NOT_SERVING)


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (
            ["--engine-core", "fork"],
            {},
            "--engine-core (OPENLORA_ENGINE_CORE) must be one of process, thread, got 'fork'",
        ),
        ([], {"OPENLORA_ENGINE_CORE": "threads"}, "must be one of process, thread, got 'threads'"),
    ],
)
def test_an_unknown_engine_core_is_refused_naming_the_flag(tmp_path, monkeypatch, capsys, argv, env, message):
    assert_refused_before_start(
        "worker", tmp_path, monkeypatch, capsys, argv, env, message, ["OPENLORA_ENGINE_CORE"]
    )


def test_the_engine_core_is_a_process_unless_asked_otherwise(monkeypatch):
    monkeypatch.delenv("OPENLORA_ENGINE_CORE", raising=False)
    common = ["worker", "--model", "m", "--control-plane", "cp:1", "--worker-token", "t" * 16]
    assert worker_config_from_args(build_parser().parse_args(common)).engine_core == "process"
    asked = build_parser().parse_args([*common, "--engine-core", "Thread"])  # any ASCII case
    assert worker_config_from_args(asked).engine_core == "thread"
