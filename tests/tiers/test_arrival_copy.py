"""A request whose adapter is in host memory starts its slot copy when it arrives (add_request), not when a
step's schedule gets to it, and is admitted in the first step after the copy is done; a copy from host
memory never queues behind a slow disk read."""

from __future__ import annotations

import threading

from tests.engine.conftest import greedy, make_engine


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
    released = threading.Event()
    try:
        warm, cold = tiny_model.ref("r8_all"), tiny_model.ref("r16_rslora")
        _on_host(engine, warm)
        read = engine.loader._read

        def blocked_read(members):
            released.wait(30.0)  # the disk stays busy until the test says so
            return read(members)

        engine.loader._read = blocked_read
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
