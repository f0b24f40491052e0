"""The engine core process (`ProcessEngine`): the same streams as the in-process loop, errors that keep
their type and field across the pipe, cancellation, backpressure counted with requests still in the pipe,
cache commands, and the core's lifetime tied to the worker's (a killed core fails every stream; a killed
worker takes its core with it; SIGTERM does not cut the core short)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from data_plane.engine.engine_core import ProcessEngine
from data_plane.engine.errors import AdapterLoadError, EngineDead, InvalidRequest, QueueFull
from data_plane.engine.llm_engine import LLMEngine
from data_plane.engine.request import AdapterRef

from .conftest import engine_config, greedy, make_engine, run_to_completion

REPO = Path(__file__).resolve().parents[2]


def _run(model, scenario, **overrides):
    """Runs `scenario(engine)` against a started ProcessEngine, stopped afterwards."""

    async def main():
        engine = ProcessEngine(engine_config(model, **overrides))
        await engine.start()
        try:
            return await scenario(engine)
        finally:
            await engine.stop()

    return asyncio.run(main())


async def _collect(stream) -> list:
    return [out async for out in stream]


async def _until(condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def test_the_core_streams_the_same_tokens_as_the_engine_in_this_process(tiny_llama):
    prompt = [5, 6, 7, 8]
    sync = make_engine(tiny_llama)
    sync.add_request(greedy("s", prompt, [tiny_llama.ref("r8_all")]))
    want_ids, want_logprobs = run_to_completion(sync)["s"]

    async def scenario(engine):
        return await asyncio.gather(
            _collect(engine.generate(greedy("a", prompt, [tiny_llama.ref("r8_all")]))),
            _collect(engine.generate(greedy("b", prompt))),
        )

    with_adapter, _ = _run(tiny_llama, scenario)
    assert [t for out in with_adapter for t in out.new_token_ids] == want_ids
    assert [lp for out in with_adapter for lp in out.new_logprobs] == pytest.approx(want_logprobs, rel=1e-5)
    last = with_adapter[-1]
    assert last.finished and last.finish_reason == "length"
    assert last.cache_tier == "disk" and last.completion_tokens == 16


def test_a_lagging_consumer_gets_the_rest_in_one_output_after_wait_delivered(tiny_llama):
    async def scenario(engine):
        stream = engine.generate(greedy("a", [5, 6, 7, 8], max_tokens=12))
        first = await anext(stream)
        # The consumer lags: the core runs the request to its end meanwhile.
        await _until(lambda: engine.num_running == 0 and engine.num_waiting == 0)
        await engine.wait_delivered()
        return first, await _collect(stream)

    first, rest = _run(tiny_llama, scenario)
    assert len(first.new_token_ids) == 1 and not first.finished
    assert len(rest) == 1 and len(rest[0].new_token_ids) == 11
    assert rest[0].finished and rest[0].completion_tokens == 12


def test_errors_keep_their_type_and_field_across_the_pipe(tiny_llama, tmp_path):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_llama.adapter_dirs["r8_all"], corrupt)
    config = json.loads((corrupt / "adapter_config.json").read_text())
    config["target_modules"] = ["no_such_module"]
    (corrupt / "adapter_config.json").write_text(json.dumps(config))

    async def scenario(engine):
        with pytest.raises(InvalidRequest) as refused:  # checked on this side, before the pipe
            await _collect(engine.generate(greedy("long", [1] * 10_000)))
        with pytest.raises(AdapterLoadError) as failed:  # found by the core, as it loaded the files
            await _collect(engine.generate(greedy("bad", [1, 2, 3], [AdapterRef("corrupt", corrupt)])))
        good = await _collect(engine.generate(greedy("good", [1, 2, 3], max_tokens=4)))
        return refused.value, failed.value, good

    refused, failed, good = _run(tiny_llama, scenario)
    assert refused.field == "prompt"
    assert failed.field == "adapter.adapter_config.json.target_modules"
    assert sum(len(out.new_token_ids) for out in good) == 4  # one request's fault fails it alone


def test_closing_a_stream_aborts_its_request_in_the_core(tiny_llama):
    async def scenario(engine):
        stream = engine.generate(greedy("long", [1, 2, 3], max_tokens=400))
        await anext(stream)
        await stream.aclose()
        await _until(lambda: engine.num_running == 0)
        after = await _collect(engine.generate(greedy("next", [1, 2, 3], max_tokens=3)))
        return after

    after = _run(tiny_llama, scenario)
    assert sum(len(out.new_token_ids) for out in after) == 3


def test_queue_full_counts_the_requests_still_in_the_pipe(tiny_llama):
    async def scenario(engine):
        os.kill(engine._process.pid, signal.SIGSTOP)  # the core takes nothing and tells nothing meanwhile
        try:
            sent = asyncio.ensure_future(_collect(engine.generate(greedy("sent", [1, 2, 3], max_tokens=2))))
            await _until(lambda: engine.num_waiting == 1)  # counted as it is sent
            with pytest.raises(QueueFull):
                await anext(engine.generate(greedy("refused", [1, 2, 3], max_tokens=2)))
        finally:
            os.kill(engine._process.pid, signal.SIGCONT)
        served = await sent
        await _until(lambda: engine._counts.adds_taken == 1)
        waiting_after = engine.num_waiting  # the core took it: no longer counted twice
        again = await _collect(engine.generate(greedy("again", [1, 2, 3], max_tokens=2)))
        return served, waiting_after, again

    served, waiting_after, again = _run(tiny_llama, scenario, max_num_seqs=1, max_waiting=1)
    assert served[-1].finished and served[-1].completion_tokens == 2
    assert waiting_after == 0
    assert again[-1].finished and again[-1].completion_tokens == 2


def test_cache_commands_reach_the_core(tiny_llama):
    ref = tiny_llama.ref("r8_all")

    async def scenario(engine):
        engine.prefetch(ref.key, (ref,), to_device=False)
        assert engine.is_loading(ref.key)  # sent and not yet taken: its files must stay
        await _until(lambda: ref.key in engine.host_adapter_keys())
        loads = engine.load_stats()[0]
        prefetched = engine.prefetch_stats()
        engine.invalidate(ref.key)
        await _until(lambda: ref.key not in engine.host_adapter_keys())
        return loads, prefetched, engine.is_loading(ref.key)

    loads, prefetched, loading_after = _run(tiny_llama, scenario)
    assert loads[("prefetch", "disk")] == 1
    assert prefetched[("performed", "host")] == 1
    assert not loading_after


def test_a_killed_core_fails_every_stream_and_the_front_stops_serving(tiny_llama):
    async def scenario(engine):
        stream = engine.generate(greedy("long", [1, 2, 3], max_tokens=400))
        await anext(stream)
        os.kill(engine._process.pid, signal.SIGKILL)
        with pytest.raises(EngineDead):
            await _collect(stream)
        assert not engine.is_running
        with pytest.raises(EngineDead):
            await anext(engine.generate(greedy("after", [1, 2, 3])))
        return engine._process.exitcode

    assert _run(tiny_llama, scenario) == -signal.SIGKILL


def test_sigterm_does_not_cut_the_core_short(tiny_llama):
    async def scenario(engine):
        stream = engine.generate(greedy("a", [1, 2, 3], max_tokens=24))
        first = await anext(stream)
        os.kill(engine._process.pid, signal.SIGTERM)  # as a signal to the worker's whole group would
        rest = await _collect(stream)
        return [first, *rest], engine.is_running

    outputs, running = _run(tiny_llama, scenario)
    assert outputs[-1].finished and outputs[-1].completion_tokens == 24
    assert running


def test_a_core_that_cannot_build_its_engine_fails_start_with_the_engines_error(tiny_llama, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(tiny_llama.model_dir, broken)
    (broken / "config.json").write_text("{not json")
    config = engine_config(tiny_llama, model_dir=broken)
    with pytest.raises(Exception) as in_process:
        LLMEngine(config)

    async def main():
        engine = ProcessEngine(config)
        with pytest.raises(type(in_process.value)) as in_core:
            await engine.start()
        return in_core.value, engine._process.exitcode

    error, exitcode = asyncio.run(main())
    assert str(error) == str(in_process.value)
    assert exitcode == 0  # it told and ended


_WORKER = """
import asyncio, sys
from pathlib import Path
from data_plane.engine.config import EngineConfig
from data_plane.engine.engine_core import ProcessEngine

async def main():
    engine = ProcessEngine(EngineConfig(model_dir=Path(sys.argv[1]), dtype="float32", num_kv_blocks=16))
    await engine.start()
    print(engine._process.pid, flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def test_a_killed_worker_takes_its_core_with_it(tiny_llama):
    worker = subprocess.Popen(
        [sys.executable, "-c", _WORKER, str(tiny_llama.model_dir)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        core = psutil.Process(int(worker.stdout.readline()))
        worker.kill()  # no chance to stop its core: the kernel closes the pipe
        worker.wait(10)
        core.wait(20)  # raises TimeoutExpired if the core outlived its worker
    finally:
        worker.kill()
        worker.wait(10)


def test_prewarm_and_invalidate_hints_act_on_the_core(tiny_llama, tmp_path):
    """apply_hint, as the worker calls it for every hint, through the core: a far prewarm into host
    memory, a near one into a slot, an invalidation out of every tier."""
    from data_plane.adapters.hint_actions import apply_hint
    from data_plane.server.artifact_store import ArtifactStore
    from openlora.hints import Hint

    ref = tiny_llama.ref("r8_all")
    store = ArtifactStore(tmp_path / "artifacts", fetch=None, spec=None, max_rank=64, max_size_bytes=1 << 30)
    shutil.copytree(ref.path, store.path_of(ref.key))

    async def scenario(engine):
        far = Hint("prewarm", "id", ref.key, tier="host", deadline_at=time.time() + 60)
        await apply_hint(engine, far, store)
        await _until(lambda: ref.key in engine.host_adapter_keys())
        on_device_after_far = ref.key in engine.resident_adapter_keys()
        near = Hint("prewarm", "id", ref.key, tier="host", deadline_at=time.time() + 0.5)
        await apply_hint(engine, near, store)
        await _until(lambda: ref.key in engine.resident_adapter_keys())
        await apply_hint(engine, Hint("invalidate", "id", ref.key), store)
        await _until(
            lambda: (
                ref.key not in engine.resident_adapter_keys() and ref.key not in engine.host_adapter_keys()
            )
        )
        return on_device_after_far

    assert not _run(tiny_llama, scenario, host_cache_bytes=64 << 20)


def test_a_core_that_cannot_be_started_fails_start_and_stop_still_stops(tiny_llama, monkeypatch):
    """The worker stops its engine when its start fails; a core process that never started must not
    turn that into another error (join of a process never started)."""
    import multiprocessing.context

    def refuse(self):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(multiprocessing.context.SpawnProcess, "start", refuse)

    async def main():
        engine = ProcessEngine(engine_config(tiny_llama))
        with pytest.raises(OSError, match="Cannot allocate memory"):
            await engine.start()
        await engine.stop()
        return engine.is_running

    assert asyncio.run(main()) is False
