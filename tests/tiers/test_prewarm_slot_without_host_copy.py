"""A prewarm of an adapter that sits in a device slot without a host copy. For a protected prediction (a
call expected at a deadline) the slot is no hold (the next admission may take it, and the adapter then
drops to disk), so the prewarm reads a host copy, and the predicted call is served warm after the slot was
taken. For a burst (unprotected: calls are coming now) the slot holds it: a host copy would only take the
room of an adapter that has no other copy."""

from __future__ import annotations

import time

from tests.engine.conftest import greedy, make_engine, run_to_completion

ONE_ADAPTER_BUDGET = 80_000  # host buffers in fp32: r8_all 65,536 B, r16_rslora 77,824 B; never both


def _in_slot_without_host_copy(engine, hinted, other) -> None:
    """`hinted` READY in a slot, its host copy given up to `other` (smaller, as often used)."""
    engine.add_request(greedy("hinted", [3, 4], [hinted], max_tokens=2))
    run_to_completion(engine)
    engine.add_request(greedy("other", [5, 6], [other], max_tokens=2))
    run_to_completion(engine)
    cache = engine.adapter_cache
    assert cache.tier_of(hinted.key) == "device" and not cache.on_host(hinted.key)
    assert cache.on_host(other.key)


def _step_until_loads_land(engine, max_steps: int = 500) -> None:
    engine.step()  # applies the prefetch
    for _ in range(max_steps):
        if not engine.loader.num_in_flight:
            return
        engine.step()
    raise AssertionError("a load never landed")


def test_prewarm_of_an_adapter_in_a_slot_without_host_copy_reads_one(tiny_model):
    engine = make_engine(tiny_model, host_cache_bytes=ONE_ADAPTER_BUDGET, num_adapter_slots=2)
    try:
        hinted, other = tiny_model.ref("r16_rslora"), tiny_model.ref("r8_all")
        _in_slot_without_host_copy(engine, hinted, other)
        engine.prefetch(hinted.key, (hinted,), deadline_at=time.monotonic() + 60)
        slot = engine.adapter_cache.slot_of(hinted.key)
        _step_until_loads_land(engine)
        assert engine.adapter_cache.slot_of(hinted.key) == slot  # its slot is left as it was
        stats = engine.prefetch_stats()
        assert stats[("performed", "host")] == 1 and ("skipped", "held") not in stats
    finally:
        engine.shutdown()


def test_burst_prewarm_of_an_adapter_in_a_slot_leaves_the_host_copy_of_another_alone(tiny_model):
    engine = make_engine(tiny_model, host_cache_bytes=ONE_ADAPTER_BUDGET, num_adapter_slots=2)
    try:
        hinted, other = tiny_model.ref("r16_rslora"), tiny_model.ref("r8_all")
        _in_slot_without_host_copy(engine, hinted, other)
        engine.prefetch(hinted.key, (hinted,), deadline_at=time.monotonic() + 1, protect=False)
        _step_until_loads_land(engine)
        cache = engine.adapter_cache
        assert cache.tier_of(hinted.key) == "device" and not cache.on_host(hinted.key)
        assert cache.on_host(other.key)  # the only copy of `other` kept its room
        stats = engine.prefetch_stats()
        assert stats[("skipped", "held")] == 1 and ("performed", "host") not in stats
    finally:
        engine.shutdown()


def test_predicted_call_after_its_slot_was_taken_is_served_from_host(tiny_model):
    engine = make_engine(tiny_model, host_cache_bytes=ONE_ADAPTER_BUDGET, num_adapter_slots=1)
    try:
        hinted, other = tiny_model.ref("r16_rslora"), tiny_model.ref("r8_all")
        engine.add_request(greedy("hinted", [3, 4], [hinted], max_tokens=2))
        run_to_completion(engine)
        engine.adapter_cache.drop_host(hinted.key)  # host memory gave its copy to another adapter
        assert engine.adapter_cache.tier_of(hinted.key) == "device"
        engine.prefetch(hinted.key, (hinted,), deadline_at=time.monotonic() + 60)
        _step_until_loads_land(engine)
        engine.add_request(greedy("other", [5, 6], [other], max_tokens=2))  # takes the only slot
        run_to_completion(engine)
        assert engine.adapter_cache.tier_of(hinted.key) == "host"
        engine.add_request(greedy("call", [7, 8], [hinted], max_tokens=2))
        tiers = []
        while engine.has_unfinished():
            tiers += [out.cache_tier for out in engine.step() if out.finished]
        assert tiers == ["host"]
    finally:
        engine.shutdown()
