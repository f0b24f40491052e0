"""An invalidation never raises in a step: waiting requests load the adapter afresh from their own files,
running ones finish on the slot they hold, and the slot is freed after them.

Regression: a request waiting for a slot when its adapter was invalidated made the next step raise
KeyError in `_start_load` (the engine's own map of adapter sources had forgotten the key), which killed
the engine loop; so did a prefetch landing after the invalidation of the adapter a request waited for.
"""

from __future__ import annotations

import shutil

from data_plane.engine.request import AdapterRef
from openlora.cache_scope import content_of

from .conftest import greedy, make_engine, run_to_completion

PROMPT = [3, 1, 4, 1, 5]


def _alone(model, ref: AdapterRef, max_tokens: int) -> list[int]:
    engine = make_engine(model)
    try:
        engine.add_request(greedy("alone", PROMPT, [ref], max_tokens=max_tokens))
        return run_to_completion(engine)["alone"][0]
    finally:
        engine.shutdown()


class _Stepper:
    """Steps an engine and keeps every request's tokens, whichever step produced them."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.tokens: dict[str, list[int]] = {}

    def step(self) -> None:
        for out in self.engine.step():
            assert out.error is None, out.error
            self.tokens.setdefault(out.request_id, []).extend(out.new_token_ids)

    def until_running(self, request_id: str) -> None:
        for _ in range(100):
            self.step()
            if any(seq.request_id == request_id for seq in self.engine.scheduler.running):
                return
        raise AssertionError(f"{request_id} never ran")

    def until_idle(self) -> dict[str, list[int]]:
        for _ in range(10_000):
            if not self.engine.has_unfinished():
                return self.tokens
            self.step()
        raise AssertionError("engine did not finish")


def test_request_waiting_for_a_slot_when_its_adapter_is_invalidated_reloads_it_from_disk(
    tiny_llama, tmp_path
):
    # The adapter's files change under the same key (replaced upstream): the waiting request must get the
    # new content from disk, not the stale host copy, and the step must not raise.
    path = tmp_path / "replaced"
    shutil.copytree(tiny_llama.adapter_dirs["r4_qv"], path)
    replaced = AdapterRef(key="replaced-adapter", path=path)
    engine = make_engine(tiny_llama, num_adapter_slots=1, host_cache_bytes=64 << 20)
    try:
        engine.add_request(greedy("old", PROMPT, [replaced], max_tokens=2))
        run_to_completion(engine)
        assert engine.adapter_cache.on_host(replaced.key)
        stepper = _Stepper(engine)
        engine.add_request(greedy("holder", PROMPT, [tiny_llama.ref("r16_rslora")], max_tokens=12))
        stepper.until_running("holder")  # it holds the only slot
        engine.add_request(greedy("waiter", PROMPT, [replaced], max_tokens=6))
        stepper.step()
        assert engine.adapter_cache.refcount(replaced.key) == 0  # waits for a slot, none promised
        shutil.rmtree(path)
        shutil.copytree(tiny_llama.adapter_dirs["r8_all"], path)
        engine.invalidate(replaced.key)
        results = stepper.until_idle()
        assert results["waiter"] == _alone(tiny_llama, AdapterRef("new", path), 6)
        assert len(results["holder"]) == 12
    finally:
        engine.shutdown()


def test_prefetch_landing_after_the_invalidation_of_a_waiting_request_adapter_is_not_kept(tiny_llama):
    ref = tiny_llama.ref("r8_all")
    engine = make_engine(tiny_llama, host_cache_bytes=64 << 20, adapter_read_delay_s=0.3)
    try:
        engine.prefetch(ref.key, (ref,))  # disk -> host, slow
        engine.step()
        assert engine.loader.is_loading(ref.key)
        engine.add_request(greedy("waiter", PROMPT, [ref], max_tokens=5))
        engine.step()  # promised a slot; the prefetch in flight is to carry on into it
        engine.invalidate(ref.key)
        results = run_to_completion(engine)
        assert results["waiter"][0] == _alone(tiny_llama, ref, 5)
        # The stale prefetch was dropped: the request's own load from disk is the one that landed.
        assert engine.load_counts[("request", "disk")] == 1
        assert engine.load_counts[("prefetch", "disk")] == 0
    finally:
        engine.shutdown()


def test_running_request_finishes_on_its_slot_and_a_later_one_gets_a_fresh_load(tiny_llama):
    ref = tiny_llama.ref("r4_qv")
    want = _alone(tiny_llama, ref, 10)
    engine = make_engine(tiny_llama, num_adapter_slots=1, host_cache_bytes=64 << 20)
    try:
        stepper = _Stepper(engine)
        engine.add_request(greedy("running", PROMPT, [ref], max_tokens=10))
        stepper.until_running("running")
        engine.invalidate(ref.key)
        engine.add_request(greedy("later", PROMPT, [ref], max_tokens=10))
        stepper.step()
        cache = engine.adapter_cache
        assert cache.slot_of(ref.key) is not None  # not pulled from under the running request
        assert cache.is_retiring(ref.key) and ref.key not in engine.resident_adapter_keys()
        results = stepper.until_idle()
        assert results["running"] == want and results["later"] == want
        assert engine.load_counts[("request", "disk")] == 2  # the later request did not reuse the old slot
        assert cache.num_free_slots + len(engine.resident_adapter_keys()) == 1
        assert cache.refcount(ref.key) == 0 and not cache.is_retiring(ref.key)
    finally:
        engine.shutdown()


def test_invalidation_of_an_unused_adapter_frees_its_slot_and_host_copy_at_the_next_step(tiny_llama):
    ref = tiny_llama.ref("r16_rslora")
    engine = make_engine(tiny_llama, num_adapter_slots=2, host_cache_bytes=64 << 20)
    try:
        engine.add_request(greedy("r", PROMPT, [ref], max_tokens=2))
        run_to_completion(engine)
        cache = engine.adapter_cache
        assert ref.key in engine.resident_adapter_keys() and ref.key in engine.host_adapter_keys()
        engine.invalidate(ref.key)
        engine.step()
        assert cache.num_free_slots == 2 and cache.host_used_bytes == 0
        assert engine.resident_adapter_keys() == [] and engine.host_adapter_keys() == []
    finally:
        engine.shutdown()


def test_invalidating_a_member_or_its_content_drops_the_mixes_built_from_it(tiny_llama):
    """A linear mix is cached under a key of its own: invalidating one member's content dropped the member
    but left the mix's slot and host copy (built from that content) until evicted."""
    mix = [tiny_llama.ref("r16_rslora", 0.5), tiny_llama.ref("r8_all", 0.5)]
    other = tiny_llama.ref("r8_all")
    engine = make_engine(tiny_llama, num_adapter_slots=4, host_cache_bytes=64 << 20)
    try:
        engine.add_request(greedy("mix", PROMPT, mix, max_tokens=2))
        engine.add_request(greedy("other", PROMPT, [other], max_tokens=2))
        run_to_completion(engine)
        mix_key = next(k for k in engine.resident_adapter_keys() if k.startswith("mix:"))
        assert mix_key in engine.host_adapter_keys()
        engine.invalidate_content(content_of(mix[0].key))
        engine.step()
        assert set(engine.resident_adapter_keys()) == {other.key}
        assert set(engine.host_adapter_keys()) == {other.key}
        # The same for one cache key of a member (a deleter's own copy of content others still serve).
        engine.add_request(greedy("again", PROMPT, mix, max_tokens=2))
        run_to_completion(engine)
        assert mix_key in engine.resident_adapter_keys()
        engine.invalidate(mix[1].key)
        engine.step()
        assert engine.resident_adapter_keys() == [] and engine.host_adapter_keys() == []
    finally:
        engine.shutdown()
