"""Every running sequence holds a reference on its adapter, so its slot stays READY until it finishes.

Regression: with more waiting sequences than `max_num_seqs` and more adapters than slots, a sequence
outside the window of waiting sequences promised a slot was admitted on an adapter another sequence had
brought in; when that one finished, the adapter was evicted under the running sequence, and the model
runner got a slot of None.
"""

from __future__ import annotations

import random

import pytest

from data_plane.engine.adapter_cache import AdapterCache, AdapterState
from data_plane.engine.block_manager import BlockManager
from data_plane.engine.request import AdapterRef
from data_plane.engine.scheduler import Scheduler, SchedulerLimits
from data_plane.engine.sequence import Sequence, SequenceStatus

from .conftest import greedy, make_engine, run_to_completion


def _seq(request_id: str, num_prompt: int, adapter: str | None = None) -> Sequence:
    return Sequence(request_id, list(range(num_prompt)), num_prompt, adapter)


def _advance(sched: Scheduler, batch) -> list[Sequence]:
    """What the engine does after a forward pass; returns the sequences that sampled a token."""
    sampled = []
    for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
        seq.num_computed_tokens += n
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(7)
            sampled.append(seq)
    return sampled


def _assert_adapter_invariants(sched: Scheduler) -> None:
    """Running sequences' adapters are READY in a slot and referenced; refcounts equal the holders."""
    cache = sched.adapters
    for seq in sched.running:
        if seq.adapter_key is None:
            continue
        assert seq.holds_adapter, seq.request_id
        assert cache.slot_of(seq.adapter_key) is not None, seq.request_id
    holders: dict[str, int] = {}
    for seq in [*sched.running, *sched.waiting]:
        if seq.holds_adapter:
            holders[seq.adapter_key] = holders.get(seq.adapter_key, 0) + 1
    for key, count in holders.items():
        assert cache.refcount(key) == count, key
        assert cache.reserved_slot(key) is not None, key


def test_sequence_admitted_on_an_adapter_promised_to_another_keeps_it_after_that_one_finishes():
    # One slot, two sequences at a time: c is outside the window of waiting sequences that are promised
    # slots, yet is admitted on x (READY thanks to a). When a finishes, b wants the slot.
    sched = Scheduler(SchedulerLimits(2, 64), BlockManager(16, 4), AdapterCache(1))
    a, b, c = _seq("a", 2, "x"), _seq("b", 2, "y"), _seq("c", 2, "x")
    for seq in (a, b, c):
        sched.add(seq)
    assert sched.schedule().loads == [("x", 0)]
    sched.adapters.mark_ready("x")
    batch = sched.schedule()
    assert batch.seqs == [a, c] and c.holds_adapter
    assert sched.adapters.refcount("x") == 2
    _advance(sched, batch)
    sched.finish(a)
    batch = sched.schedule()
    assert batch.loads == [] and batch.seqs == [c]  # x stays in its slot: c still runs on it
    assert sched.adapters.slot_of("x") == 0 and b.status is SequenceStatus.WAITING
    _advance(sched, batch)
    sched.finish(c)
    assert sched.schedule().loads == [("y", 0)]  # only now may x leave


def test_prefetched_adapter_is_referenced_by_the_sequence_admitted_on_it():
    sched = Scheduler(SchedulerLimits(1, 64), BlockManager(16, 4), AdapterCache(1))
    sched.adapters.prefetch("x")
    sched.adapters.mark_ready("x")
    blocker, seq = _seq("blocker", 2), _seq("s", 2, "x")
    sched.add(blocker)
    sched.add(seq)
    batch = sched.schedule()  # the window (one sequence) holds only the base-model one
    assert batch.seqs == [blocker]
    _advance(sched, batch)
    sched.finish(blocker)
    sched.schedule()
    assert seq.status is SequenceStatus.RUNNING and sched.adapters.refcount("x") == 1
    assert not sched.adapters.evict("x")


def test_preempted_sequence_keeps_its_adapter_reference_until_it_finishes():
    sched = Scheduler(SchedulerLimits(4, 64), BlockManager(4, 4), AdapterCache(2))
    a, b = _seq("a", 8, "x"), _seq("b", 8, "y")
    sched.add(a)
    sched.add(b)
    sched.schedule()
    sched.adapters.mark_ready("x")
    sched.adapters.mark_ready("y")
    _advance(sched, sched.schedule())  # both prefilled, all 4 blocks used
    batch = sched.schedule()
    assert batch.preempted == [b]
    assert b.holds_adapter and sched.adapters.refcount("y") == 1
    assert not sched.adapters.can_admit("z")  # y is still promised to b, x runs
    _advance(sched, batch)
    sched.finish(a)
    batch = sched.schedule()
    assert batch.seqs == [b] and sched.adapters.slot_of("y") is not None
    _assert_adapter_invariants(sched)


@pytest.mark.parametrize("seed", range(6))
def test_random_workload_keeps_every_running_adapter_ready_after_every_step(seed):
    """Many adapters over few slots, more sequences than max_num_seqs, small KV (preemption), loads that
    finish a step later, aborts and finishes freeing slots mid-run."""
    rng = random.Random(seed)
    num_slots = rng.choice([1, 2, 4])
    sched = Scheduler(SchedulerLimits(rng.choice([6, 16]), 32), BlockManager(8, 4), AdapterCache(num_slots))
    keys = [f"k{i}" for i in range(rng.choice([3, 10, 30]))]
    targets = {}
    for i in range(60):
        seq = _seq(f"r{i}", rng.randrange(1, 12), rng.choice([*keys, None]))
        targets[seq.request_id] = rng.randrange(1, 6)
        sched.add(seq)
    loading: list[str] = []
    num_preemptions = 0
    for _ in range(2_000):
        if not sched.has_unfinished():
            break
        for key in loading:
            if sched.adapters.state(key) is AdapterState.LOADING:
                sched.adapters.mark_ready(key)
        batch = sched.schedule()
        loading = [key for key, _ in batch.loads]
        assert len(set(loading)) == len(loading)
        num_preemptions += len(batch.preempted)
        for seq in batch.seqs:
            assert seq.adapter_key is None or sched.adapters.slot_of(seq.adapter_key) is not None
        _assert_adapter_invariants(sched)
        for seq in _advance(sched, batch):
            if seq.num_output_tokens >= targets[seq.request_id]:
                sched.finish(seq)
        if sched.running and rng.random() < 0.05:
            sched.finish(rng.choice(sched.running))  # an abort
        _assert_adapter_invariants(sched)
    assert not sched.has_unfinished()
    assert all(sched.adapters.refcount(key) == 0 for key in keys)
    assert num_preemptions > 0


def _weighted_refs(model, num_adapters: int) -> list[AdapterRef]:
    """Distinct adapters cheaply: each of the tiny adapters at a different weight is its own cache key."""
    names = list(model.adapter_dirs)
    refs = []
    for i in range(num_adapters):
        name = names[i % len(names)]
        refs.append(AdapterRef(model.ref(name).key, model.adapter_dirs[name], weight=0.5 + 0.01 * i))
    return refs


def _requests(model, num_requests: int, refs: list[AdapterRef], seed: int):
    rng = random.Random(seed)
    requests = []
    for i in range(num_requests):
        prompt = [rng.randrange(model.vocab_size) for _ in range(rng.randrange(2, 20))]
        adapters = [rng.choice(refs)] if rng.random() < 0.9 else []
        requests.append(greedy(f"r{i}", prompt, adapters, max_tokens=rng.randrange(1, 10)))
    return requests


def _run_checking_slots(engine, max_steps: int = 5_000) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return tokens
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        for seq in engine.scheduler.running:
            if seq.adapter_key is not None:
                assert engine.adapter_cache.slot_of(seq.adapter_key) is not None, seq.request_id
    raise AssertionError("engine did not finish")


def test_256_requests_over_100_adapters_and_32_slots_run_at_128_sequences(tiny_llama):
    engine = make_engine(
        tiny_llama, num_adapter_slots=32, max_num_seqs=128, num_kv_blocks=1024, host_cache_bytes=0
    )
    requests = _requests(tiny_llama, 256, _weighted_refs(tiny_llama, 100), seed=1)
    for request in requests:
        engine.add_request(request)
    tokens = _run_checking_slots(engine)
    assert {r.request_id: len(tokens[r.request_id]) for r in requests} == {
        r.request_id: r.sampling.max_tokens for r in requests
    }
    assert engine.adapter_cache.num_free_slots + len(engine.resident_adapter_keys()) == 32
    assert all(engine.adapter_cache.refcount(key) == 0 for key in engine.resident_adapter_keys())


def test_outputs_under_slot_and_kv_pressure_equal_each_request_run_alone(tiny_llama):
    # Three base-model requests fill the 6 KV blocks at the first step whatever the adapter loads do, then
    # outgrow them (30 + 6 tokens need 3 blocks each): preemption is certain.
    rng = random.Random(3)
    fillers = [
        greedy(f"base{i}", [rng.randrange(tiny_llama.vocab_size) for _ in range(30)], max_tokens=6)
        for i in range(3)
    ]
    requests = fillers + _requests(tiny_llama, 40, _weighted_refs(tiny_llama, 12), seed=2)
    engine = make_engine(tiny_llama, num_adapter_slots=3, max_num_seqs=16, num_kv_blocks=6)
    for request in requests:
        engine.add_request(request)
    seqs = [engine._states[r.request_id].seq for r in requests]
    together = run_to_completion(engine)
    assert sum(seq.num_preemptions for seq in seqs) > 0
    alone_engine = make_engine(tiny_llama, num_adapter_slots=3, max_num_seqs=1)
    for request in requests:
        alone_engine.add_request(request)
        alone = run_to_completion(alone_engine)[request.request_id]
        got_tokens, got_logprobs = together[request.request_id]
        assert got_tokens == alone[0], request.request_id
        assert got_logprobs == pytest.approx(alone[1], abs=1e-4), request.request_id
