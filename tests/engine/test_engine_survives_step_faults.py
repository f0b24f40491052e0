"""A fault in a step fails only that step's requests, leaks nothing, and the engine goes on; an engine that
cannot go on (a fatal fault, or too many failed steps in a row) stops and fails every stream EngineDead."""

from __future__ import annotations

import asyncio

import pytest
import torch

from data_plane.engine.async_engine import AsyncEngine
from data_plane.engine.errors import EngineDead, InvalidRequest, StepFailed

from .conftest import greedy, make_engine, run_to_completion

PROMPT = [5, 6, 7, 8]


def _fail_calls(obj, name: str, error: BaseException, times: int | None = 1) -> list[int]:
    """Makes obj.name raise `error` on its next `times` calls (None: on every call); returns a call log."""
    original = getattr(obj, name)
    calls: list[int] = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if times is None or len(calls) <= times:
            raise error
        return original(*args, **kwargs)

    setattr(obj, name, wrapper)
    return calls


async def _tokens(engine: AsyncEngine, request) -> list[int]:
    tokens: list[int] = []
    async for out in engine.generate(request):
        tokens += out.new_token_ids
    return tokens


async def _settled(inner) -> None:
    for _ in range(200):
        if not inner.has_unfinished():
            return
        await asyncio.sleep(0.01)


def test_a_step_that_raises_fails_its_requests_and_gives_back_blocks_and_adapters(tiny_llama):
    want = make_engine(tiny_llama)
    want.add_request(greedy("later", PROMPT, [tiny_llama.ref("r4_qv")], max_tokens=6))
    want_tokens = run_to_completion(want)["later"][0]

    engine = make_engine(tiny_llama)
    free_blocks = engine.scheduler.blocks.num_free_blocks
    key = tiny_llama.ref("r4_qv").key
    engine.add_request(greedy("a", PROMPT, [tiny_llama.ref("r4_qv")], max_tokens=200))
    engine.add_request(greedy("b", [1, 2, 3], max_tokens=200))
    while engine.adapter_cache.refcount(key) == 0 or engine.scheduler.num_running < 2:
        engine.step()  # until both run (the adapter loads on its own thread meanwhile)
    _fail_calls(engine.runner, "run", RuntimeError("injected fault"))
    with pytest.raises(RuntimeError, match="injected fault"):
        engine.step()
    outputs = engine.step()
    failed = {o.request_id: o for o in outputs}
    assert set(failed) == {"a", "b"}
    assert all(o.finished and o.finish_reason == "abort" for o in failed.values())
    assert all(isinstance(o.error, StepFailed) for o in failed.values())
    assert engine.scheduler.blocks.num_free_blocks == free_blocks
    assert engine.adapter_cache.refcount(key) == 0
    assert not engine.has_unfinished()

    engine.add_request(greedy("later", PROMPT, [tiny_llama.ref("r4_qv")], max_tokens=6))
    assert run_to_completion(engine)["later"][0] == want_tokens


def test_async_engine_survives_a_failed_step_and_serves_later_requests(tiny_llama):
    async def main():
        inner = make_engine(tiny_llama)
        free_blocks = inner.scheduler.blocks.num_free_blocks
        _fail_calls(inner.runner, "run", RuntimeError("injected fault"))
        engine = AsyncEngine(engine=inner)
        await engine.start()
        try:
            with pytest.raises(StepFailed):
                await _tokens(engine, greedy("first", PROMPT, [tiny_llama.ref("r8_all")], max_tokens=4))
            later = await _tokens(engine, greedy("later", PROMPT, [tiny_llama.ref("r8_all")], max_tokens=4))
            await _settled(inner)
            key = tiny_llama.ref("r8_all").key
            return (
                later,
                engine.is_running,
                inner.scheduler.blocks.num_free_blocks - free_blocks,
                inner.adapter_cache.refcount(key),
            )
        finally:
            await engine.stop()

    later, is_running, leaked_blocks, refs = asyncio.run(main())
    assert len(later) == 4 and is_running
    assert leaked_blocks == 0 and refs == 0


def test_a_domain_error_raised_in_a_step_reaches_the_stream_as_it_is(tiny_llama):
    async def main():
        inner = make_engine(tiny_llama)
        _fail_calls(inner, "sampler", InvalidRequest("sampling.temperature", "made this step fail"))
        engine = AsyncEngine(engine=inner)
        await engine.start()
        try:
            with pytest.raises(InvalidRequest) as error:
                await _tokens(engine, greedy("first", PROMPT, max_tokens=4))
            return error.value.field, await _tokens(engine, greedy("later", PROMPT, max_tokens=4))
        finally:
            await engine.stop()

    field, later = asyncio.run(main())
    assert field == "sampling.temperature" and len(later) == 4


def test_a_request_the_engine_fails_to_add_fails_alone(tiny_llama):
    async def main():
        inner = make_engine(tiny_llama)
        _fail_calls(inner, "add_request", TypeError("injected defect"))
        engine = AsyncEngine(engine=inner)
        await engine.start()
        try:
            with pytest.raises(StepFailed):
                await _tokens(engine, greedy("first", PROMPT, max_tokens=4))
            return await _tokens(engine, greedy("later", PROMPT, max_tokens=4)), engine.is_running
        finally:
            await engine.stop()

    later, is_running = asyncio.run(main())
    assert len(later) == 4 and is_running


def test_too_many_failed_steps_in_a_row_stop_the_engine(tiny_llama):
    async def main():
        inner = make_engine(tiny_llama)
        _fail_calls(inner.runner, "run", RuntimeError("broken for good"), times=None)
        engine = AsyncEngine(engine=inner, max_step_failures=2)
        await engine.start()
        try:
            with pytest.raises(StepFailed):
                await _tokens(engine, greedy("first", PROMPT, max_tokens=4))
            assert engine.is_running
            with pytest.raises(EngineDead):
                await _tokens(engine, greedy("second", PROMPT, max_tokens=4))
            with pytest.raises(EngineDead):
                await _tokens(engine, greedy("third", PROMPT, max_tokens=4))
            return engine.is_running, engine.error
        finally:
            await engine.stop()

    is_running, error = asyncio.run(main())
    assert not is_running and isinstance(error, EngineDead)


def test_a_fatal_fault_stops_the_engine_at_once(tiny_llama):
    async def main():
        inner = make_engine(tiny_llama)
        _fail_calls(inner.runner, "run", torch.cuda.OutOfMemoryError("injected: out of device memory"))
        engine = AsyncEngine(engine=inner)
        await engine.start()
        try:
            with pytest.raises(EngineDead):
                await _tokens(engine, greedy("first", PROMPT, max_tokens=4))
            return engine.is_running, engine.error
        finally:
            await engine.stop()

    is_running, error = asyncio.run(main())
    assert not is_running and isinstance(error, torch.cuda.OutOfMemoryError)
