"""BlockManager, AdapterCache and Scheduler: plain Python, no model."""

from __future__ import annotations

import sys

import pytest

from data_plane.engine.adapter_cache import AdapterCache, AdapterState
from data_plane.engine.block_manager import BlockManager
from data_plane.engine.scheduler import Scheduler, SchedulerLimits
from data_plane.engine.sequence import Sequence, SequenceStatus


def _seq(request_id: str, num_prompt: int, adapter: str | None = None) -> Sequence:
    return Sequence(request_id, list(range(num_prompt)), num_prompt, adapter)


def _scheduler(num_blocks=16, block_size=4, slots=2, max_seqs=8, max_tokens=64) -> Scheduler:
    return Scheduler(
        SchedulerLimits(max_seqs, max_tokens), BlockManager(num_blocks, block_size), AdapterCache(slots)
    )


def _advance(sched: Scheduler, batch, sample_token: int = 7) -> None:
    """What the engine does after a forward pass: count computed tokens, append a sample when due."""
    for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
        seq.num_computed_tokens += n
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(sample_token)


# BlockManager


def test_blocks_are_allocated_per_block_size_and_returned_on_free():
    blocks = BlockManager(num_blocks=4, block_size=4)
    seq = _seq("a", 5)
    assert blocks.blocks_needed(seq, 5) == 2
    blocks.allocate(seq, 5)
    assert len(seq.block_ids) == 2 and blocks.num_free_blocks == 2
    seq.num_computed_tokens = 5
    assert blocks.blocks_needed(seq, 3) == 0  # tokens 6..8 still fit the second block
    assert blocks.blocks_needed(seq, 4) == 1
    blocks.free(seq)
    assert seq.block_ids == [] and blocks.num_free_blocks == 4


def test_allocation_beyond_free_blocks_is_refused():
    blocks = BlockManager(num_blocks=2, block_size=4)
    seq = _seq("a", 9)
    assert not blocks.can_allocate(seq, 9)
    with pytest.raises(RuntimeError):
        blocks.allocate(seq, 9)


# AdapterCache


def test_adapter_cache_hands_out_free_slots_then_evicts_least_recently_used_unreferenced():
    cache = AdapterCache(num_slots=2)
    slot_a, _ = cache.admit("a")
    slot_b, _ = cache.admit("b")
    assert {slot_a, slot_b} == {0, 1}
    cache.mark_ready("a")
    cache.mark_ready("b")
    cache.acquire("a")
    cache.release("a")  # a is now the most recently used
    assert cache.can_admit("c")
    slot_c, evicted = cache.admit("c")
    assert evicted == "b" and slot_c == slot_b
    assert cache.state("b") is None and cache.state("c") is AdapterState.LOADING


def test_referenced_and_loading_adapters_are_never_evicted():
    cache = AdapterCache(num_slots=2)
    cache.admit("a")
    cache.mark_ready("a")
    cache.acquire("a")
    cache.admit("b")  # loading
    assert not cache.can_admit("c")
    assert not cache.evict("a") and not cache.evict("b")
    cache.release("a")
    assert cache.can_admit("c")
    assert cache.evict("a") and cache.slot_of("a") is None


def test_failed_load_frees_its_slot_and_prefetch_takes_no_reference():
    cache = AdapterCache(num_slots=1)
    slot = cache.prefetch("a")
    assert slot == 0 and cache.refcount("a") == 0
    assert cache.prefetch("a") is None  # already there
    cache.fail("a")
    assert cache.state("a") is None and cache.can_admit("b")
    cache.release("a")  # a release after the failure is harmless


def test_resident_keys_are_ready_adapters_most_recent_first():
    cache = AdapterCache(num_slots=3)
    for key in ("a", "b", "c"):
        cache.admit(key)
    cache.mark_ready("a")
    cache.mark_ready("b")
    assert cache.resident_keys() == ["b", "a"]


# Scheduler


def test_prefill_then_decode_one_token_per_step():
    sched = _scheduler()
    seq = _seq("a", 6)
    sched.add(seq)
    batch = sched.schedule()
    assert batch.seqs == [seq] and batch.num_tokens == [6]
    _advance(sched, batch)
    batch = sched.schedule()
    assert batch.num_tokens == [1]


def test_long_prompt_is_prefilled_in_chunks_within_the_token_budget():
    sched = _scheduler(max_tokens=8)
    long, short = _seq("long", 20), _seq("short", 3)
    sched.add(long)
    sched.add(short)
    batch = sched.schedule()
    assert batch.num_tokens == [8]  # the budget is spent on the first chunk
    _advance(sched, batch)
    batch = sched.schedule()
    assert batch.num_tokens == [8]
    _advance(sched, batch)
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["long", "short"] and batch.num_tokens == [4, 3]


def test_running_sequences_are_capped_by_max_num_seqs():
    sched = _scheduler(max_seqs=2)
    for i in range(3):
        sched.add(_seq(f"s{i}", 2))
    batch = sched.schedule()
    assert len(batch.seqs) == 2 and sched.num_waiting == 1


def test_admission_waits_for_free_kv_blocks():
    sched = _scheduler(num_blocks=3, block_size=4)
    first, second = _seq("a", 8), _seq("b", 8)
    sched.add(first)
    sched.add(second)
    batch = sched.schedule()
    assert batch.seqs == [first] and sched.num_waiting == 1
    _advance(sched, batch)
    sched.finish(first)
    assert sched.schedule().seqs == [second]


def test_out_of_blocks_preempts_the_latest_sequence_by_recompute():
    sched = _scheduler(num_blocks=4, block_size=4)
    a, b = _seq("a", 8), _seq("b", 8)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    _advance(sched, batch)  # both full: 4 blocks used, each now has 9 tokens
    batch = sched.schedule()
    assert batch.preempted == [b] and batch.seqs == [a]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0 and b.block_ids == []
    assert sched.waiting[0] is b
    _advance(sched, batch)
    sched.finish(a)
    batch = sched.schedule()
    assert batch.seqs == [b] and batch.num_tokens == [9]  # prompt and its sampled token again


def test_sequence_waits_while_its_adapter_loads_and_others_run():
    sched = _scheduler()
    lora, plain = _seq("lora", 4, adapter="x"), _seq("plain", 4)
    sched.add(lora)
    sched.add(plain)
    batch = sched.schedule()
    assert batch.loads == [("x", 0)] and batch.seqs == [plain]
    assert sched.adapters.refcount("x") == 1  # promised to the waiting sequence
    sched.adapters.mark_ready("x")
    batch = sched.schedule()
    assert lora in batch.seqs


def test_finish_returns_blocks_and_adapter_reference():
    sched = _scheduler()
    seq = _seq("a", 4, adapter="x")
    sched.add(seq)
    sched.schedule()
    sched.adapters.mark_ready("x")
    sched.schedule()
    assert seq.status is SequenceStatus.RUNNING
    sched.finish(seq)
    assert sched.blocks.num_free_blocks == 16 and sched.adapters.refcount("x") == 0
    assert not sched.has_unfinished()


def test_failed_adapter_removes_only_the_sequences_waiting_for_it():
    sched = _scheduler()
    bad, good = _seq("bad", 4, adapter="x"), _seq("good", 4, adapter="y")
    sched.add(bad)
    sched.add(good)
    sched.schedule()
    failed = sched.fail_adapter("x")
    assert failed == [bad] and bad.status is SequenceStatus.FINISHED
    assert list(sched.waiting) == [good] and sched.adapters.state("x") is None


def test_no_free_adapter_slot_leaves_the_sequence_waiting_without_a_load():
    sched = _scheduler(slots=1)
    first, second = _seq("a", 2, adapter="x"), _seq("b", 2, adapter="y")
    sched.add(first)
    sched.add(second)
    batch = sched.schedule()
    assert batch.loads == [("x", 0)] and not second.holds_adapter
    sched.adapters.mark_ready("x")
    batch = sched.schedule()
    assert batch.seqs == [first]
    _advance(sched, batch)
    sched.finish(first)
    batch = sched.schedule()
    assert batch.loads == [("y", 0)]  # x was evicted once unreferenced


def _python_calls(action) -> int:
    """How many Python functions (lambdas and generators' resumptions included) `action()` runs: a
    deterministic measure of its work."""
    calls = 0

    def count(_frame, event, _arg):
        nonlocal calls
        if event == "call":
            calls += 1

    sys.setprofile(count)
    try:
        action()
    finally:
        sys.setprofile(None)
    return calls


def test_a_steps_work_grows_with_the_waiting_requests_not_with_them_times_their_tenants():
    """A step's schedule passes over the waiting queue in fair order several times. Regression: each next
    unit of that order was the least of every waiting tenant's, taken anew, and each unit below its share
    searched every tenant for one above it once none was left, so a step cost the waiting requests times
    their tenants (1,024 requests of 1,024 tenants: 0.4 s per step, during which no running stream made a
    token). A tenant's place in the order is now kept in a heap, and the search stops once it found none."""

    def calls_per_waiting_request(num_waiting: int, num_tenants: int) -> float:
        sched = _scheduler(num_blocks=4096, slots=4, max_seqs=8, max_tokens=4096)
        for i in range(8):  # one tenant runs everything, on every slot
            sched.add(Sequence(f"flood{i}", [1, 2, 3], 3, f"hot{i % 4}", tenant="flood"))
        for _ in range(2):
            batch = sched.schedule()
            for key, _slot in batch.loads:
                sched.adapters.mark_ready(key)
            _advance(sched, batch)
        for i in range(num_waiting):  # each for an adapter in no slot
            sched.add(Sequence(f"w{i}", [1, 2, 3], 3, f"cold{i}", tenant=f"t{i % num_tenants}"))
        return _python_calls(sched.schedule) / num_waiting

    # Each request of its own tenant: four times the requests, four times the tenants.
    assert calls_per_waiting_request(1024, 1024) <= 1.5 * calls_per_waiting_request(256, 256)


def test_no_running_sequence_is_preempted_for_ones_that_wait_for_an_adapter_slot():
    """Tenants below their share wait, each for an adapter of its own, while every slot is held by running
    work: they cannot run before a slot frees, so once the slots are shared out nothing more is preempted
    for them. Regression: at every step a running sequence of the tenant above its share was preempted
    for them and, none of them able to use the room, taken in again at once (work-conserving): its whole
    context computed again at every step, for as long as they waited."""
    sched = _scheduler(num_blocks=4096, block_size=16, slots=4, max_seqs=8, max_tokens=4096)
    for i in range(8):  # one tenant runs everything, on every slot
        sched.add(Sequence(f"flood{i}", [1] * 50, 50, f"hot{i % 4}", tenant="flood"))

    def step():
        batch = sched.schedule()
        for key, _slot in batch.loads:
            sched.adapters.mark_ready(key)
        _advance(sched, batch)
        return batch

    for _ in range(3):
        step()
    for i in range(20):
        sched.add(Sequence(f"w{i}", [1] * 5, 5, f"cold{i}", tenant=f"t{i}"))
    for _ in range(5):  # the slots are shared out: some of the flood's are given up to three tenants
        step()
    assert {seq.tenant for seq in sched.running} == {"flood", "t0", "t1", "t2"}
    for _ in range(10):
        batch = step()
        assert batch.preempted == []
        assert all(n == 1 for n in batch.num_tokens)  # decode only: no context computed again


def _lines_run(action) -> int:
    """How many lines of the scheduler's module `action()` runs: a deterministic measure of its work that
    also sees loops with no Python call in them."""
    lines = 0
    module = Scheduler.schedule.__code__.co_filename

    def local(_frame, event, _arg):
        nonlocal lines
        if event == "line":
            lines += 1
        return local

    def trace(frame, _event, _arg):
        return local if frame.f_code.co_filename == module else None

    sys.settrace(trace)
    try:
        action()
    finally:
        sys.settrace(None)
    return lines


def test_a_steps_work_grows_with_the_waiting_requests_when_no_tenant_holds_a_slot_it_may_give_up():
    """Every slot is held by a tenant within its share of the running set and of the slots; many tenants
    wait, each for an adapter in no slot. Regression: for each waiting request the step looked for a slot
    to free, each look walking every running and waiting sequence, though none could be freed (1,024
    tenants waiting for their own adapters on 16 slots: 0.2 s per step, no running stream making a token)."""

    def lines_per_waiting_request(num_waiting: int) -> float:
        sched = _scheduler(num_blocks=8192, slots=4, max_seqs=8, max_tokens=4096)
        for i in range(4):  # four tenants, one request each, on every slot
            sched.add(Sequence(f"hot{i}", [1, 2, 3], 3, f"hot{i}", tenant=f"hot{i}"))
        for _ in range(2):
            batch = sched.schedule()
            for key, _slot in batch.loads:
                sched.adapters.mark_ready(key)
            _advance(sched, batch)
        for i in range(num_waiting):  # each of its own tenant, for an adapter in no slot
            sched.add(Sequence(f"w{i}", [1, 2, 3], 3, f"cold{i}", tenant=f"t{i}"))
        batch = sched.schedule()
        assert batch.preempted == [] and batch.loads == []
        return _lines_run(sched.schedule) / num_waiting

    assert lines_per_waiting_request(1024) <= 1.5 * lines_per_waiting_request(256)
