"""AsyncEngine streaming and cancellation; typed errors for bad requests; failing adapters fail alone."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from data_plane.engine.async_engine import AsyncEngine
from data_plane.engine.errors import AdapterLoadError, InvalidRequest, QueueFull
from data_plane.engine.request import AdapterRef, EngineRequest, SamplingOptions

from .conftest import greedy, make_engine, run_to_completion


def _collect(engine, request):
    async def go():
        outputs = []
        async for out in engine.generate(request):
            outputs.append(out)
        return outputs

    return go()


def test_async_engine_streams_the_same_tokens_as_the_sync_engine(tiny_llama):
    prompt = [5, 6, 7, 8]
    sync = make_engine(tiny_llama)
    sync.add_request(greedy("s", prompt, [tiny_llama.ref("r8_all")]))
    want = run_to_completion(sync)["s"][0]

    async def main():
        engine = AsyncEngine(engine=make_engine(tiny_llama))
        await engine.start()
        try:
            runs = await asyncio.gather(
                _collect(engine, greedy("a", prompt, [tiny_llama.ref("r8_all")])),
                _collect(engine, greedy("b", prompt)),
            )
        finally:
            await engine.stop()
        return runs

    with_adapter, _ = asyncio.run(main())
    assert [t for out in with_adapter for t in out.new_token_ids] == want
    assert with_adapter[-1].finished and with_adapter[-1].finish_reason == "length"
    assert with_adapter[-1].cache_tier == "disk" and with_adapter[-1].completion_tokens == 16


def test_lagging_consumer_gets_the_first_token_alone_then_the_rest_in_one_output(tiny_llama):
    prompt = [5, 6, 7, 8]
    sync = make_engine(tiny_llama)
    sync.add_request(greedy("s", prompt, [tiny_llama.ref("r8_all")], max_tokens=12))
    want_ids, want_logprobs = run_to_completion(sync)["s"]

    async def main():
        inner = make_engine(tiny_llama)
        engine = AsyncEngine(engine=inner)
        await engine.start()
        try:
            stream = engine.generate(greedy("a", prompt, [tiny_llama.ref("r8_all")], max_tokens=12))
            first = await anext(stream)
            while inner.has_unfinished():  # the consumer lags: the engine runs the request to its end
                await asyncio.sleep(0.01)
            await engine.wait_delivered()
            return first, [out async for out in stream]
        finally:
            await engine.stop()

    first, rest = asyncio.run(main())
    assert first.new_token_ids == want_ids[:1] and not first.finished
    assert len(rest) == 1  # eleven steps' outputs in one
    (merged,) = rest
    assert merged.new_token_ids == want_ids[1:]
    # Another run on another thread: the same greedy tokens, logprobs equal up to float rounding.
    assert merged.new_logprobs == pytest.approx(want_logprobs[1:], rel=1e-5)
    assert merged.finished and merged.finish_reason == "length" and merged.completion_tokens == 12


def test_closing_the_stream_aborts_and_frees_blocks_and_adapter(tiny_llama):
    async def main():
        inner = make_engine(tiny_llama)
        engine = AsyncEngine(engine=inner)
        await engine.start()
        try:
            request = greedy("long", [1, 2, 3], [tiny_llama.ref("r4_qv")], max_tokens=400)
            stream = engine.generate(request)
            await stream.__anext__()
            await stream.__anext__()
            await stream.aclose()
            for _ in range(100):
                if inner.num_running == 0 and inner.num_waiting == 0:
                    break
                await asyncio.sleep(0.02)
            key = tiny_llama.ref("r4_qv").key
            return (
                inner.num_running,
                inner.scheduler.blocks.num_free_blocks,
                inner.adapter_cache.refcount(key),
            )
        finally:
            await engine.stop()

    running, free_blocks, refs = asyncio.run(main())
    assert running == 0 and free_blocks == 64 and refs == 0


def test_async_engine_raises_typed_errors(tiny_llama, tmp_path):
    async def main():
        engine = AsyncEngine(engine=make_engine(tiny_llama, max_waiting=0))
        await engine.start()
        try:
            with pytest.raises(InvalidRequest) as bad:
                await _collect(engine, greedy("x", []))
            with pytest.raises(QueueFull):
                await _collect(engine, greedy("y", [1, 2]))
            return bad.value.field
        finally:
            await engine.stop()

    assert asyncio.run(main()) == "prompt"


def test_the_waiting_queues_last_places_are_kept_for_tenants_with_few_requests(tiny_llama, monkeypatch):
    """Two tenants within their stream caps filled the whole waiting queue and every other tenant was
    refused RESOURCE_EXHAUSTED. With the queue within its last eighth, a tenant with FEW_REQUESTS or more
    in the engine is refused and one with fewer is still taken."""
    import dataclasses

    from data_plane.engine import async_engine

    monkeypatch.setattr(async_engine.AsyncEngine, "num_waiting", property(lambda self: 14))

    async def main():
        engine = AsyncEngine(engine=make_engine(tiny_llama, max_waiting=16))  # 2 places kept
        await engine.start()
        try:
            engine._tenant_requests["heavy"] = async_engine.FEW_REQUESTS
            heavy = dataclasses.replace(greedy("heavy-1", [1, 2], max_tokens=2), tenant="heavy")
            with pytest.raises(QueueFull) as refused:
                await _collect(engine, heavy)
            light = dataclasses.replace(greedy("light-1", [1, 2], max_tokens=2), tenant="light")
            served = await _collect(engine, light)
            return str(refused.value), served, dict(engine._tenant_requests)
        finally:
            await engine.stop()

    message, served, counts = asyncio.run(main())
    assert "the last 2 places are kept for tenants with fewer than 4 requests" in message
    assert served  # the light tenant's request ran
    assert counts == {"heavy": async_engine.FEW_REQUESTS}  # light's count went back to nothing


@pytest.mark.parametrize(
    ("options", "field"),
    [
        (SamplingOptions(max_tokens=0), "sampling.max_tokens"),
        (SamplingOptions(max_tokens=10**6), "sampling.max_tokens"),
        (SamplingOptions(temperature=-1.0), "sampling.temperature"),
        (SamplingOptions(top_p=0.0), "sampling.top_p"),
        (SamplingOptions(top_k=-2), "sampling.top_k"),
        (SamplingOptions(repetition_penalty=0.0), "sampling.repetition_penalty"),
        (SamplingOptions(stop=("x",)), "sampling.stop"),  # the tiny model has no tokenizer
    ],
)
def test_bad_sampling_values_are_refused_by_field(tiny_llama, options, field):
    engine = make_engine(tiny_llama)
    with pytest.raises(InvalidRequest) as e:
        engine.add_request(EngineRequest("r", [1, 2, 3], options))
    assert e.value.field == field


def test_prompt_longer_than_the_model_allows_is_refused(tiny_llama):
    engine = make_engine(tiny_llama, max_model_len=32)
    with pytest.raises(InvalidRequest) as e:
        engine.add_request(greedy("r", list(range(40))))
    assert e.value.field == "prompt"
    with pytest.raises(InvalidRequest):
        engine.add_request(greedy("r", [300]))  # outside the vocabulary


def test_mix_above_the_rank_limit_is_refused_naming_mix(tiny_llama):
    engine = make_engine(tiny_llama)
    mix = [tiny_llama.ref("r64_all", 0.5), tiny_llama.ref("r4_qv", 0.5)]
    with pytest.raises(InvalidRequest) as e:
        engine.add_request(greedy("r", [1, 2], mix))
    assert e.value.field == "mix"


def test_unknown_adapter_is_refused(tiny_llama, tmp_path):
    engine = make_engine(tiny_llama)
    with pytest.raises(AdapterLoadError):
        engine.add_request(greedy("r", [1, 2], [AdapterRef("k", tmp_path / "missing")]))


def test_adapter_that_does_not_fit_the_base_model_fails_only_its_requests(tiny_llama, tmp_path):
    # The config claims rank 4 but the tensors have rank 8: refused on the loader thread.
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_llama.adapter_dirs["r8_all"], corrupt)
    config = json.loads((corrupt / "adapter_config.json").read_text())
    config["r"] = 4
    (corrupt / "adapter_config.json").write_text(json.dumps(config))
    engine = make_engine(tiny_llama)
    engine.add_request(greedy("bad", [1, 2, 3], [AdapterRef("corrupt", Path(corrupt))]))
    engine.add_request(greedy("good", [1, 2, 3], [tiny_llama.ref("r4_qv")]))
    engine.add_request(greedy("base", [1, 2, 3]))
    outputs = []
    while engine.has_unfinished():
        outputs.extend(engine.step())
    failed = [o for o in outputs if o.request_id == "bad"]
    assert len(failed) == 1 and failed[0].finish_reason == "abort"
    assert isinstance(failed[0].error, AdapterLoadError)
    for request_id in ("good", "base"):
        done = [o for o in outputs if o.request_id == request_id and o.finished]
        assert done and done[0].finish_reason == "length" and done[0].error is None
    assert engine.adapter_cache.state("corrupt") is None


def test_a_stream_ended_by_fail_is_aborted_in_the_engine(tiny_llama):
    """`fail` (a revoked key's stream) ended the caller's stream, but the request ran on in the engine to
    its max_tokens (its slot, KV blocks and steps spent on tokens nobody receives or pays for)."""

    class Revoked(Exception):
        pass

    inner = make_engine(tiny_llama)
    finals = []
    step = inner.step

    def recording_step():
        outputs = step()
        finals.extend(out for out in outputs if out.finished)
        return outputs

    inner.step = recording_step

    async def main():
        engine = AsyncEngine(engine=inner)
        await engine.start()
        try:
            stream = engine.generate(greedy("r", [5, 6, 7, 8], [tiny_llama.ref("r8_all")], max_tokens=300))
            assert (await stream.__anext__()).new_token_ids
            engine.fail("r", Revoked())
            with pytest.raises(Revoked):
                async for _ in stream:
                    pass
            for _ in range(200):
                if not inner.has_unfinished():
                    break
                await asyncio.sleep(0.05)
        finally:
            await engine.stop()

    asyncio.run(main())
    assert [(out.finish_reason, out.completion_tokens < 300) for out in finals] == [("abort", True)]
