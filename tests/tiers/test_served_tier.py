"""`cache_tier` reports where the adapter came from when the request got its slot, not where it was when
the request arrived: a request that arrives while a prefetch is reading its adapter into host memory is
served from that host copy ("host"), one whose slot is filled by a disk read reports "disk"."""

from __future__ import annotations

from tests.engine.conftest import block_disk_reads, greedy, make_engine, run_to_completion


def _finals(engine) -> dict:
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    return finals


def test_request_arriving_while_its_prefetch_reads_into_host_memory_reports_host(tiny_model):
    engine = make_engine(tiny_model, host_cache_bytes=64 << 20)
    released = block_disk_reads(engine)
    try:
        ref = tiny_model.ref("r8_all")
        engine.prefetch(ref.key, (ref,))  # disk -> host memory, held up
        engine.step()
        assert engine.loader.is_loading(ref.key) and engine.adapter_cache.tier_of(ref.key) == "disk"
        engine.add_request(greedy("r", [4, 5], [ref], max_tokens=2))
        released.set()
        final = _finals(engine)["r"]
        assert final.error is None and final.cache_tier == "host"
        assert final.adapter_load_ms > 0  # it waited for the read, then the copy
        assert engine.load_counts == {("prefetch", "disk"): 1, ("request", "host"): 1}
    finally:
        released.set()
        engine.shutdown()


def test_request_arriving_while_a_disk_read_fills_its_slot_reports_disk(tiny_model):
    engine = make_engine(tiny_model, host_cache_bytes=64 << 20)
    released = block_disk_reads(engine)
    try:
        ref = tiny_model.ref("r8_all")
        engine.prefetch(ref.key, (ref,), to_device=True)  # disk -> slot, held up
        engine.step()
        engine.add_request(greedy("r", [4, 5], [ref], max_tokens=2))
        released.set()
        assert _finals(engine)["r"].cache_tier == "disk"
        engine.add_request(greedy("again", [4, 5], [ref], max_tokens=2))  # ready in its slot on arrival
        assert _finals(engine)["again"].cache_tier == "device"
    finally:
        released.set()
        engine.shutdown()


def test_adapter_evicted_between_arrival_and_admission_reports_the_tier_it_came_back_from(tiny_model):
    engine = make_engine(tiny_model, host_cache_bytes=64 << 20, num_adapter_slots=1, max_num_seqs=1)
    try:
        other, shared = tiny_model.ref("r4_qv"), tiny_model.ref("r8_all")
        engine.add_request(greedy("warmup", [1, 2], [shared], max_tokens=2))
        run_to_completion(engine)
        engine.add_request(greedy("running", [1, 2], [shared], max_tokens=4))
        engine.step()  # runs on the only slot
        engine.add_request(greedy("first", [1, 2], [other], max_tokens=2))  # waits for the slot
        # Arrives with its adapter ready in the slot, behind "first": once "running" ends, "first" takes
        # the slot and "later" gets its adapter back from host memory.
        engine.add_request(greedy("later", [1, 2], [shared], max_tokens=2))
        assert engine.adapter_cache.tier_of(shared.key) == "device"
        finals = _finals(engine)
        assert finals["running"].cache_tier == "device"
        assert finals["first"].cache_tier == "disk" and finals["later"].cache_tier == "host"
    finally:
        engine.shutdown()


def test_each_request_counts_its_wait_for_its_first_step_under_the_tier_it_was_served_from(tiny_model):
    """The wait the cache prices slots by (`AdapterCache.record_wait`): a disk read, then calls on the
    slot it filled; a base-model request names no tier and counts for none."""
    engine = make_engine(tiny_model, host_cache_bytes=64 << 20)
    try:
        ref = tiny_model.ref("r8_all")
        engine.add_request(greedy("first", [4, 5], [ref], max_tokens=2))
        run_to_completion(engine)
        for i in range(3):
            engine.add_request(greedy(f"again-{i}", [4, 5], [ref], max_tokens=2))
        engine.add_request(greedy("base", [4, 5], [], max_tokens=2))
        run_to_completion(engine)
        waits = engine.adapter_cache.waits()
        assert set(waits) == {"disk", "device"}
        assert waits["disk"][1] == 1 and waits["device"][1] == 3
        assert all(average >= 0.0 for average, _ in waits.values())
    finally:
        engine.shutdown()
