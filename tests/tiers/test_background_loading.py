"""Loads run on the loader thread: others keep decoding while an adapter loads; host tier reloads."""

from __future__ import annotations

from tests.engine.conftest import greedy, make_engine, run_to_completion


def test_slow_adapter_load_does_not_stall_decoding_of_other_requests(tiny_model):
    # KV room for both plain requests at the model's full length, so neither is ever preempted.
    engine = make_engine(tiny_model, adapter_read_delay_s=1.0, host_cache_bytes=64 << 20, num_kv_blocks=160)
    try:
        plain_ids = ("plain0", "plain1")
        for i, request_id in enumerate(plain_ids):
            prompt = [1, 2, 3, 4 + i]
            # As long as the model allows: a fast machine may still finish them before the load lands.
            max_tokens = engine.max_model_len - len(prompt)
            engine.add_request(greedy(request_id, prompt, max_tokens=max_tokens))
        engine.step()  # both prefilled, now decoding
        engine.add_request(greedy("lora", [5, 6, 7], adapters=[tiny_model.ref("r8_all")], max_tokens=4))
        decoding = set(plain_ids)
        steps_while_loading = 0
        lora_tokens_while_loading = 0
        while True:
            outputs = engine.step()
            if not engine.loader.num_in_flight:
                break
            if decoding:
                steps_while_loading += 1
            by_request = {out.request_id: out for out in outputs}
            # every request still decoding produced a token in this step, though the load is in flight
            for request_id in sorted(decoding):
                assert len(by_request[request_id].new_token_ids) == 1, request_id
                if by_request[request_id].finished:
                    decoding.discard(request_id)
            if "lora" in by_request:
                lora_tokens_while_loading += len(by_request["lora"].new_token_ids)
        assert steps_while_loading >= 2  # steps with a plain request decoding while the load was in flight
        assert lora_tokens_while_loading == 0  # it waited for its adapter
        # the adapter has landed: its prefill runs in the next step
        outputs = {out.request_id: out for out in engine.step()}
        assert outputs["lora"].new_token_ids and outputs["lora"].cache_tier == "disk"
        assert outputs["lora"].adapter_load_ms >= 1000
    finally:
        engine.shutdown()


def test_adapter_evicted_from_its_slot_is_reloaded_from_host_memory(tiny_model):
    engine = make_engine(tiny_model, num_adapter_slots=1, host_cache_bytes=64 << 20)
    try:
        first = tiny_model.ref("r4_qv")
        second = tiny_model.ref("r8_all")
        engine.add_request(greedy("a1", [1, 2, 3], adapters=[first], max_tokens=3))
        expected = run_to_completion(engine)["a1"]
        engine.add_request(greedy("b", [1, 2, 3], adapters=[second], max_tokens=3))
        run_to_completion(engine)
        cache = engine.adapter_cache
        assert cache.tier_of(first.key) == "host" and cache.on_host(second.key)
        engine.add_request(greedy("a2", [1, 2, 3], adapters=[first], max_tokens=3))
        tiers = []
        results = {}
        while engine.has_unfinished():
            for out in engine.step():
                results.setdefault(out.request_id, []).extend(out.new_token_ids)
                if out.finished:
                    tiers.append(out.cache_tier)
        assert tiers == ["host"]
        assert results["a2"] == expected[0]  # same tokens as when loaded from disk
    finally:
        engine.shutdown()


def test_prefetch_hint_brings_an_adapter_into_host_memory_before_its_request(tiny_model):
    engine = make_engine(tiny_model, host_cache_bytes=64 << 20)
    try:
        ref = tiny_model.ref("r16_rslora")
        engine.prefetch(ref.key, (ref,))
        assert engine.has_unfinished()
        while engine.has_unfinished():
            engine.step()
        assert engine.adapter_cache.tier_of(ref.key) == "host"
        engine.prefetch(ref.key, (ref,), to_device=True)
        while engine.has_unfinished():
            engine.step()
        assert engine.adapter_cache.tier_of(ref.key) == "device"
        engine.add_request(greedy("r", [4, 5], adapters=[ref], max_tokens=2))
        finals = [out for out in engine.step() if out.request_id == "r"]
        assert finals and finals[0].cache_tier == "device"
    finally:
        engine.shutdown()


def test_invalidated_adapter_leaves_every_tier_at_the_next_step(tiny_model):
    engine = make_engine(tiny_model, host_cache_bytes=64 << 20)
    try:
        ref = tiny_model.ref("r4_qv")
        engine.add_request(greedy("r", [4, 5], adapters=[ref], max_tokens=2))
        run_to_completion(engine)
        assert engine.adapter_cache.tier_of(ref.key) == "device" and engine.adapter_cache.on_host(ref.key)
        engine.invalidate(ref.key)
        engine.step()
        assert engine.adapter_cache.tier_of(ref.key) == "disk"
        assert engine.adapter_cache.host_buffer(ref.key) is None and ref.key not in engine.host_adapter_keys()
        assert ref.key not in engine.resident_adapter_keys()
    finally:
        engine.shutdown()
