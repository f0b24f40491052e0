"""A request whose adapter is in host memory starts its slot copy when it arrives (add_request), not when a
step's schedule gets to it, and is admitted in the first step after the copy is done; a copy from host
memory never queues behind a slow disk read."""

from __future__ import annotations

import threading

from tests.engine.conftest import block_disk_reads, greedy, make_engine


def _drain(engine) -> None:
    while engine.has_unfinished():
        engine.step()


def _on_host(engine, ref) -> None:
    engine.prefetch(ref.key, (ref,))
    _drain(engine)
    assert engine.adapter_cache.tier_of(ref.key) == "host"


def test_copy_from_host_starts_on_arrival_and_the_request_runs_in_the_next_step(tiny_model):
    engine = make_engine(tiny_model, host_cache_bytes=64 << 20)
    try:
        warm = tiny_model.ref("r8_all")
        _on_host(engine, warm)
        engine.add_request(greedy("popular", [1, 2, 3], max_tokens=20))
        engine.step()  # decoding from now on
        engine.add_request(greedy("warm", [4, 5, 6], [warm], max_tokens=3))
        assert engine.loader.is_copying_from_host(warm.key)  # started by add_request, before any step
        engine.loader.wait_for({warm.key}, 30.0)
        outputs = {out.request_id: out for out in engine.step()}
        assert outputs["warm"].new_token_ids  # admitted and prefilled in the first step after the copy
        assert outputs["popular"].new_token_ids
    finally:
        engine.shutdown()


def test_copy_from_host_does_not_wait_behind_a_disk_read(tiny_model):
    engine = make_engine(tiny_model, host_cache_bytes=64 << 20)
    warm, cold = tiny_model.ref("r8_all"), tiny_model.ref("r16_rslora")
    _on_host(engine, warm)
    released = block_disk_reads(engine)  # the disk stays busy until the test says so
    try:
        engine.add_request(greedy("cold", [1, 2], [cold], max_tokens=2))
        engine.add_request(greedy("warm", [4, 5, 6], [warm], max_tokens=2))
        engine.loader.wait_for({warm.key}, 30.0)
        outputs = {out.request_id: out for out in engine.step()}
        assert outputs["warm"].new_token_ids and "cold" not in outputs
        assert engine.loader.is_loading(cold.key)
        released.set()
        _drain(engine)
        assert engine.adapter_cache.tier_of(cold.key) == "device"
    finally:
        released.set()
        engine.shutdown()


def test_a_request_arriving_during_a_step_starts_its_copy_before_that_step_ends(tiny_model):
    """Through the AsyncEngine: the step that runs when the request arrives takes it in between two of its
    layers, so the copy from host memory overlaps the rest of that step instead of waiting for its end."""
    import asyncio

    from data_plane.engine.async_engine import AsyncEngine

    engine = make_engine(tiny_model, host_cache_bytes=64 << 20)
    warm = tiny_model.ref("r8_all")
    _on_host(engine, warm)
    layers = engine.runner.model.model.layers
    in_step, arrived = threading.Event(), threading.Event()
    seen_in_layer_1: list[bool] = []
    first_layer, second_layer = layers[0].forward, layers[1].forward

    def held_first_layer(*args, **kwargs):
        out = first_layer(*args, **kwargs)
        if not in_step.is_set():
            in_step.set()
            arrived.wait(30.0)  # the request arrives while this step is between its first two layers
        return out

    def watched_second_layer(*args, **kwargs):
        if in_step.is_set() and arrived.is_set() and not seen_in_layer_1:
            seen_in_layer_1.append(engine.adapter_cache.state(warm.key) is not None)
        return second_layer(*args, **kwargs)

    async def scenario():
        runner = AsyncEngine(engine=engine)
        await runner.start()
        try:
            layers[0].forward, layers[1].forward = held_first_layer, watched_second_layer
            background = asyncio.ensure_future(
                _collect(runner.generate(greedy("bg", [1, 2, 3], max_tokens=8)))
            )
            assert await asyncio.to_thread(in_step.wait, 30.0)  # its first step is held after layer 0
            request = asyncio.ensure_future(_collect(runner.generate(greedy("warm", [4, 5, 6], [warm], 3))))
            while (
                runner._engine_loop._inbox.empty()
            ):  # generate has handed the request to the (held) engine thread
                await asyncio.sleep(0.001)
            arrived.set()
            outputs = await request
            await background
            return outputs
        finally:
            arrived.set()
            await runner.stop()

    outputs = asyncio.run(scenario())
    assert seen_in_layer_1 == [True]  # its slot was taken (and its copy begun) inside the running step
    final = outputs[-1]
    assert final.error is None and final.cache_tier == "host" and final.completion_tokens == 3


async def _collect(stream) -> list:
    return [out async for out in stream]
