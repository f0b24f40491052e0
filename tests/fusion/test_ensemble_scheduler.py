"""The scheduler moves an ensemble's K sequences as one unit: plain Python bookkeeping, no model.

Each test builds a group the way the engine does (K sequences sharing one `group` list) and checks that it
is admitted, run, preempted and finished whole, with KV blocks and adapter references for all K members.
"""

from __future__ import annotations

import random
from collections import Counter

from data_plane.engine.adapter_cache import AdapterCache, AdapterState
from data_plane.engine.block_manager import BlockManager
from data_plane.engine.scheduler import Scheduler, SchedulerLimits
from data_plane.engine.sequence import Sequence, SequenceStatus


def _seq(request_id: str, num_prompt: int, adapter: str | None = None) -> Sequence:
    return Sequence(request_id, list(range(num_prompt)), num_prompt, adapter)


def _group(request_id: str, num_prompt: int, adapters: list[str | None], tenant: str = "") -> Sequence:
    """A group's leader (its members share one `group` list); a group of one adapter is a lone sequence."""
    if len(adapters) == 1:
        return Sequence(request_id, list(range(num_prompt)), num_prompt, adapters[0], tenant=tenant)
    group: list[Sequence] = []
    for key in adapters:
        group.append(
            Sequence(request_id, list(range(num_prompt)), num_prompt, key, group=group, tenant=tenant)
        )
    return group[0]


def _scheduler(num_blocks=16, block_size=4, slots=4, max_seqs=8, max_tokens=64) -> Scheduler:
    return Scheduler(
        SchedulerLimits(max_seqs, max_tokens), BlockManager(num_blocks, block_size), AdapterCache(slots)
    )


def _ready(sched: Scheduler, *keys: str) -> None:
    """Loads finish: every promised adapter becomes READY (what the engine does when a load lands)."""
    for key in keys:
        sched.adapters.mark_ready(key)


def _advance(batch) -> None:
    """What the engine does after a forward pass: count computed tokens; one token for every member of a
    group that reached its end (the combined token), or for a sequence on its own."""
    for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
        seq.num_computed_tokens += n
    for seq in batch.seqs:
        if seq.is_leader and seq.num_computed_tokens == seq.num_tokens:
            for member in seq.members:
                member.token_ids.append(7)


def _units_whole(sched: Scheduler, batch) -> None:
    """Every group in the batch is there with all its members and one token count."""
    counts = {id(seq): n for seq, n in zip(batch.seqs, batch.num_tokens, strict=True)}
    for seq in batch.seqs:
        assert all(id(m) in counts for m in seq.members), seq.request_id
        assert {counts[id(m)] for m in seq.members} == {counts[id(seq)]}, seq.request_id
    for seq in [*sched.running, *sched.waiting]:
        assert {m.status for m in seq.members} == {seq.status}, seq.request_id


def test_group_is_admitted_only_once_every_member_adapter_is_ready():
    sched = _scheduler()
    leader = _group("e", 3, ["x", None, "y"])
    sched.add(leader)
    batch = sched.schedule()
    assert batch.is_empty and sorted(key for key, _ in batch.loads) == ["x", "y"]
    _ready(sched, "x")
    assert sched.schedule().is_empty  # y still loads: no member runs
    _ready(sched, "y")
    batch = sched.schedule()
    assert batch.seqs == leader.members and batch.num_tokens == [3, 3, 3]
    assert sched.num_running == 1 and len(sched.running) == 3


def test_group_needs_blocks_for_all_members_and_is_not_admitted_half():
    # 5 blocks of 4: a 6-token prompt needs 2 blocks per member; K = 3 needs 6.
    sched = _scheduler(num_blocks=5, slots=4)
    leader = _group("e", 6, [None, None, None])
    sched.add(leader)
    assert sched.schedule().is_empty
    assert all(m.status is SequenceStatus.WAITING and not m.block_ids for m in leader.members)
    # With one block more it goes in whole, holding the blocks of all three.
    sched = _scheduler(num_blocks=6, slots=4)
    leader = _group("e", 6, [None, None, None])
    sched.add(leader)
    batch = sched.schedule()
    assert batch.seqs == leader.members and sched.blocks.num_free_blocks == 0
    assert all(len(m.block_ids) == 2 for m in leader.members)


def test_token_budget_is_shared_by_the_members_of_a_group():
    # A budget of 10 tokens and K = 3: a 7-token prompt prefills 3 tokens per member per step.
    sched = _scheduler(max_tokens=10)
    leader = _group("e", 7, [None, None, None])
    sched.add(leader)
    batch = sched.schedule()
    assert batch.num_tokens == [3, 3, 3]
    _advance(batch)
    assert sched.schedule().num_tokens == [3, 3, 3]


def test_group_larger_than_the_free_sequence_room_waits_for_it_whole():
    sched = _scheduler(max_seqs=3)
    solo = _seq("s", 2)
    sched.add(solo)
    leader = _group("e", 2, [None, None, None])
    sched.add(leader)
    batch = sched.schedule()
    assert batch.seqs == [solo]  # 1 + 3 members > 3 sequences: the group waits
    sched.finish(solo)
    assert sched.schedule().seqs == leader.members


def test_kv_pressure_preempts_a_group_whole_and_readmits_it_whole():
    # 6 blocks of 2 tokens: a solo of 3 tokens and a group of two 3-token members use 2 blocks each.
    sched = _scheduler(num_blocks=6, block_size=2)
    solo = _seq("s", 3)
    leader = _group("e", 3, [None, None])
    sched.add(solo)
    sched.add(leader)
    batch = sched.schedule()
    assert batch.seqs == [solo, *leader.members] and sched.blocks.num_free_blocks == 0
    _advance(batch)
    # Decoding the 4th token fits the blocks held; the 5th needs a new block each: the group (admitted
    # last) is preempted whole, giving back its 4 blocks, and the solo goes on.
    batch = sched.schedule()
    _advance(batch)
    batch = sched.schedule()
    assert set(map(id, batch.preempted)) == set(map(id, leader.members))
    assert batch.seqs == [solo]
    assert all(m.status is SequenceStatus.WAITING and m.num_computed_tokens == 0 for m in leader.members)
    assert list(sched.waiting) == leader.members  # still in member order
    sched.finish(solo)
    batch = sched.schedule()
    assert batch.seqs == leader.members and batch.num_tokens == [5, 5]


def test_finishing_one_member_finishes_the_group_and_returns_all_blocks_and_references():
    sched = _scheduler(slots=4)
    leader = _group("e", 3, ["x", "y", None])
    sched.add(leader)
    sched.schedule()
    _ready(sched, "x", "y")
    batch = sched.schedule()
    assert batch.seqs == leader.members
    assert sched.adapters.refcount("x") == sched.adapters.refcount("y") == 1
    sched.finish(leader.members[1])
    assert all(m.status is SequenceStatus.FINISHED and not m.block_ids for m in leader.members)
    assert sched.blocks.num_free_blocks == sched.blocks.num_blocks
    assert sched.adapters.refcount("x") == sched.adapters.refcount("y") == 0
    assert not sched.has_unfinished()


def test_failed_load_of_one_member_removes_the_whole_group_and_its_other_references():
    sched = _scheduler(slots=4)
    leader = _group("e", 3, ["x", "y"])
    other = _seq("o", 3, "y")
    sched.add(leader)
    sched.add(other)
    sched.schedule()
    failed = sched.fail_adapter("x")
    assert failed == [leader]
    assert all(m.status is SequenceStatus.FINISHED for m in leader.members)
    assert sched.adapters.refcount("y") == 1  # the solo's reference only
    assert list(sched.waiting) == [other]


def test_random_mixes_of_groups_and_solos_never_split_a_group_and_leak_nothing():
    rng = random.Random(11)
    keys = ["a", "b", "c", "d", "e"]
    for trial in range(30):
        sched = _scheduler(num_blocks=24, block_size=4, slots=4, max_seqs=6, max_tokens=24)
        for i in range(rng.randint(1, 6)):
            prompt = rng.randint(1, 9)
            if rng.random() < 0.5:
                members = rng.sample([*keys, None], rng.randint(2, 3))
                sched.add(_group(f"g{trial}.{i}", prompt, members))
            else:
                sched.add(_seq(f"s{trial}.{i}", prompt, rng.choice([*keys, None])))
        for _ in range(300):
            if not sched.has_unfinished():
                break
            batch = sched.schedule()
            for key, _slot in batch.loads:
                _ready(sched, key)
            _units_whole(sched, batch)
            _advance(batch)
            for seq in list(sched.running):
                if seq.is_leader and seq.status is SequenceStatus.RUNNING and seq.num_output_tokens >= 4:
                    sched.finish(seq)
            if sched.running and rng.random() < 0.05:
                sched.finish(rng.choice(sched.running))  # an abort of any member ends its group
        assert not sched.has_unfinished(), trial
        assert sched.blocks.num_free_blocks == sched.blocks.num_blocks
        assert all(sched.adapters.refcount(k) == 0 for k in keys)


def _run_to_the_end(sched: Scheduler, max_steps: int = 200) -> None:
    """Schedules with every load landing at once, each unit finishing after two tokens."""
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return
        batch = sched.schedule()
        for key, _slot in batch.loads:
            _ready(sched, key)
        _units_whole(sched, batch)
        _advance(batch)
        for seq in list(sched.running):
            if seq.is_leader and seq.status is SequenceStatus.RUNNING and seq.num_output_tokens >= 2:
                sched.finish(seq)
    held = {s.request_id: s.adapter_key for s in sched.waiting if s.holds_adapter}
    raise AssertionError(f"stuck: running {len(sched.running)}, waiting units holding adapters {held}")


def test_groups_needing_every_slot_never_hold_a_part_each():
    # Two slots: holding one adapter each, two groups would wait for the other's slot for ever (with two
    # tenants the slot share took one slot of the first group's for the second's).
    for tenants in ("aa", "ab"):
        sched = _scheduler(slots=2)
        for i, (members, tenant) in enumerate(zip([["x", "y"], ["z", "w"]], tenants, strict=True)):
            sched.add(_group(f"g{i}", 3, members, tenant))
        _run_to_the_end(sched)
        assert all(sched.adapters.refcount(k) == 0 for k in "xyzw"), tenants


def test_a_group_sharing_an_adapter_with_a_running_one_does_not_keep_it_from_the_next():
    # The third group takes y while the first runs on it; the second then got z's slot and waited for w
    # while the third held y and waited for w too: every slot held, nothing running.
    for tenants in ("aaa", "abc"):
        sched = _scheduler(slots=2)
        specs = [["x", "y"], ["z", "w"], ["y", "w"]]
        for i, (members, tenant) in enumerate(zip(specs, tenants, strict=True)):
            sched.add(_group(f"g{i}", 3, members, tenant))
        _run_to_the_end(sched)
        assert all(sched.adapters.refcount(k) == 0 for k in "xyzw"), tenants


def test_a_group_waiting_for_slots_keeps_the_freed_ones_from_requests_for_other_absent_adapters():
    """Promised whole or not at all, a group needing two slots waited for ever while requests for other
    absent adapters kept coming: each slot that freed went to the next of them first."""
    sched = _scheduler(slots=2, max_seqs=8, num_blocks=64)
    for key in ("c", "d"):  # two requests hold both slots, started a step apart: their slots free in turn
        sched.add(_seq(f"run-{key}", 3, key))
        batch = sched.schedule()
        _ready(sched, *(k for k, _ in batch.loads))
        _advance(batch)
    group = _group("g", 3, ["x", "y"]).members
    sched.add(group[0])
    arrivals = iter(f"n{i}" for i in range(100))
    admitted_group_at = None
    for step in range(40):
        sched.add(_seq(f"s{step}", 3, next(arrivals)))  # one request for a new adapter every step
        batch = sched.schedule()
        for key, _slot in batch.loads:
            _ready(sched, key)
        _advance(batch)
        if any(seq is group[0] for seq in batch.seqs):
            admitted_group_at = step
            break
        for seq in list(sched.running):  # every running request ends after two tokens
            if seq.is_leader and seq.num_output_tokens >= 2:
                sched.finish(seq)
    assert admitted_group_at is not None, "the group never got its two slots"
    # What waited behind it runs after it, and nothing is left holding anything.
    _run_to_the_end(sched)
    assert all(sched.adapters.refcount(k) == 0 for k in ("c", "d", "x", "y"))


def _steps_until_running(sched: Scheduler, request_id: str, max_steps: int = 20) -> int:
    """Schedules with every load landing at once and nothing finishing; the step at which `request_id`
    first runs."""
    for step in range(1, max_steps + 1):
        batch = sched.schedule()
        for key, _slot in batch.loads:
            _ready(sched, key)
        _units_whole(sched, batch)
        _advance(batch)
        if any(seq.request_id == request_id for seq in batch.seqs):
            return step
    held = {s.request_id: s.adapter_key for s in sched.waiting if s.holds_adapter}
    raise AssertionError(f"{request_id} did not run in {max_steps} steps; waiting units holding {held}")


def _flood_then_group(max_seqs: int) -> Scheduler:
    """Four slots, each held by one of another tenant's endless streams; then a group of two absent
    adapters of a second tenant."""
    sched = _scheduler(num_blocks=64, slots=4, max_seqs=max_seqs)
    for i, key in enumerate(["a1", "a2", "a3", "a4"]):
        sched.add(Sequence(f"flood-{i}", [1, 2, 3], 3, key, tenant="flood"))
    for _ in range(3):
        batch = sched.schedule()
        for key, _slot in batch.loads:
            _ready(sched, key)
        _advance(batch)
    assert len(sched.running) == 4
    sched.add(_group("group", 3, ["x", "y"], "victim"))
    return sched


def test_a_group_within_its_slot_share_gets_its_slots_whole_from_a_tenant_holding_every_slot():
    # Slot share: 4 slots, 2 tenants. The flood runs its share (4 of 8) on 4 adapters, every slot; the
    # group's two adapters fit its share of 2 slots. It waited for one of the flood's streams to end.
    sched = _flood_then_group(max_seqs=8)
    assert _steps_until_running(sched, "group") <= 2
    assert sum(s.tenant == "flood" for s in sched.running) == 2  # two streams gave up their slots


def test_a_group_of_a_tenant_below_its_share_gets_its_slots_whole_from_a_tenant_above_it():
    # The flood runs 4 of 4 (its share is 2) on 4 adapters: two slots are freed for the group at once. Only
    # one was, the group could not be promised half, and the preempted stream took its slot back.
    sched = _flood_then_group(max_seqs=4)
    assert _steps_until_running(sched, "group") <= 2


def test_groups_above_their_tenants_share_are_not_kept_out_by_room_for_requests_waiting_on_their_slots():
    """Two running sequences in all and three tenants: each tenant's share is one, so two groups (two
    sequences each) hold every slot and run only where no room is kept for tenants below their share. Room
    was kept for single requests waiting for a slot the groups hold: nothing ran, for ever."""
    sched = _scheduler(slots=4, max_seqs=2, num_blocks=64)
    specs = [("a", ["v", "x"]), ("c", ["z", "y"]), ("a", ["w"]), ("c", ["w"]), ("b", ["y"]), ("a", ["v"])]
    for i, (tenant, keys) in enumerate(specs):
        sched.add(_group(f"u{i}", 3, keys, tenant))
    _run_to_the_end(sched)
    assert all(sched.adapters.refcount(k) == 0 for k in "vwxyz")


def test_random_groups_and_solos_of_several_tenants_always_run_to_the_end():
    """Groups and single requests of up to seven tenants over 2-4 slots and 2-16 running sequences, every
    load landing at once: each mix runs to its end (the stalls above were found this way)."""
    rng = random.Random(3)
    for trial in range(400):
        slots, max_seqs = rng.choice([2, 3, 4]), rng.choice([2, 4, 8, 16])
        sched = _scheduler(slots=slots, max_seqs=max_seqs, num_blocks=64)
        for i in range(rng.randint(2, 12)):
            tenant = rng.choice("abcdefg")
            if rng.random() < 0.4:  # a group fits the slots and the running set, as the engine checks
                keys = rng.sample(["v", "w", "x", "y", "z"], rng.randint(2, min(slots, max_seqs, 3)))
                sched.add(_group(f"g{trial}.{i}", 3, keys, tenant))
            else:
                key = rng.choice(["v", "w", "x", "y", "z", None])
                sched.add(Sequence(f"s{trial}.{i}", [1, 2, 3], 3, key, tenant=tenant))
        _run_to_the_end(sched)
        assert all(sched.adapters.refcount(k) == 0 for k in "vwxyz"), trial


def _preempted_and_run(batch) -> list[str]:
    """The sequences that a step both preempts and runs: preempted for nothing, their context to compute
    again."""
    scheduled = {id(seq) for seq in batch.seqs}
    return [seq.request_id for seq in batch.preempted if id(seq) in scheduled]


def test_a_unit_preempted_before_a_group_that_made_the_room_keeps_running():
    """Three running sequences, three tenants: a share of one each. The flood runs a group and, newer, a
    request; two other tenants' requests wait. Making their room preempts the request, then the group:
    the request's room was not needed, and it was taken in again in the same step."""
    sched = _scheduler(slots=4, max_seqs=3, num_blocks=64)
    group = _group("group", 3, [None, None], "flood")
    sched.add(group)
    _advance(sched.schedule())
    newest = Sequence("newest", [1, 2, 3], 3, None, tenant="flood")
    sched.add(newest)
    _advance(sched.schedule())
    assert sched.running == [*group.members, newest]
    sched.add(Sequence("a", [1, 2, 3], 3, None, tenant="a"))
    sched.add(Sequence("b", [1, 2, 3], 3, None, tenant="b"))
    batch = sched.schedule()
    assert _preempted_and_run(batch) == []
    assert batch.preempted == group.members
    assert sorted(seq.request_id for seq in sched.running) == ["a", "b", "newest"]
    assert newest.num_preemptions == 0


def _arrive(sched: Scheduler, rng: random.Random, outputs: dict[int, int], count: int, prefix: str) -> None:
    """`count` groups and single requests of up to seven tenants, with prompts and outputs of random
    lengths (`outputs`: id of a unit's first sequence -> the tokens it generates)."""
    slots, max_seqs = sched.adapters.num_slots, sched.limits.max_num_seqs
    for _ in range(count):
        request_id, tenant, prompt = f"{prefix}.{len(outputs)}", rng.choice("abcdefg"), rng.randint(1, 12)
        if rng.random() < 0.4:  # a group fits the slots and the running set, as the engine checks
            keys = rng.sample(["v", "w", "x", "y", "z"], rng.randint(2, min(slots, max_seqs, 3)))
            unit = _group(request_id, prompt, keys, tenant)
        else:
            key = rng.choice(["v", "w", "x", "y", "z", None])
            unit = Sequence(request_id, list(range(prompt)), prompt, key, tenant=tenant)
        outputs[id(unit)] = rng.randint(1, 8)
        sched.add(unit)


def test_random_tenants_groups_and_arrivals_never_preempt_a_sequence_the_same_step_runs():
    """Groups and single requests of up to seven tenants arriving over the first steps, over 2-4 slots,
    2-16 running sequences and a KV cache to spare or not: no step preempts a sequence (for room, or a
    slot, for another tenant) that it then runs again, its context computed again for nothing, and every
    mix runs to its end. Before, one step in 80 did, in one mix in four."""
    rng = random.Random(5)
    for trial in range(300):
        sched = _scheduler(
            slots=rng.choice([2, 3, 4]), max_seqs=rng.choice([2, 4, 8, 16]), num_blocks=rng.choice([32, 256])
        )
        outputs: dict[int, int] = {}
        _arrive(sched, rng, outputs, rng.randint(2, 12), f"r{trial}")
        for step in range(400):
            if not sched.has_unfinished():
                break
            if step < 30 and rng.random() < 0.3:
                _arrive(sched, rng, outputs, rng.randint(1, 4), f"r{trial}")
            batch = sched.schedule()
            assert _preempted_and_run(batch) == [], (trial, step)
            for key, _slot in batch.loads:
                _ready(sched, key)
            _units_whole(sched, batch)
            _advance(batch)
            for seq in list(sched.running):
                if seq.is_leader and seq.num_output_tokens >= outputs[id(seq)]:
                    sched.finish(seq)
        assert not sched.has_unfinished(), trial
        assert sched.blocks.num_free_blocks == sched.blocks.num_blocks, trial
        assert all(sched.adapters.refcount(k) == 0 for k in "vwxyz"), trial


def test_a_slot_freed_for_another_tenant_is_the_retiring_one_its_preempted_holders_free():
    """Two slots, both held by a flood: a group on K and R, a request on K. R is invalidated while the
    group runs on it (retiring). Another tenant's request for an absent adapter gets a slot: preempting
    the group frees R's. Regression: a retiring adapter was passed over, K's holders (the group and the
    request) were preempted, the request's adapter x took R's slot freed by the group, K stayed unused in
    its own, and the request was taken in again in the same step, its context computed again."""
    sched = _scheduler(slots=2, max_seqs=4, num_blocks=64)
    group = _group("group", 3, ["K", "R"], "flood")
    solo = Sequence("solo", [1, 2, 3], 3, "K", tenant="flood")
    sched.add(group)
    sched.add(solo)
    _ready(sched, *(key for key, _ in sched.schedule().loads))
    _advance(sched.schedule())
    assert sched.running == [*group.members, solo]
    sched.release_waiting("R")  # what the engine does for an invalidation
    sched.adapters.invalidate("R")
    assert sched.adapters.is_retiring("R")
    sched.add(Sequence("other", [1, 2, 3], 3, "x", tenant="other"))
    batch = sched.schedule()
    assert _preempted_and_run(batch) == []
    assert batch.preempted == group.members
    assert [key for key, _ in batch.loads] == ["x"]
    assert solo in sched.running and solo.num_preemptions == 0


def _check_invariants(sched: Scheduler, batch) -> None:
    """What the scheduler's docstrings promise after every step."""
    assert len(sched.running) <= sched.limits.max_num_seqs
    assert sum(batch.num_tokens) <= sched.limits.max_num_batched_tokens
    assert _preempted_and_run(batch) == []
    assert all(seq.status is SequenceStatus.RUNNING for seq in batch.seqs)
    for seq in sched.running:  # a referenced adapter never leaves its slot
        if seq.adapter_key is not None:
            assert seq.holds_adapter, seq.request_id
            assert sched.adapters.state(seq.adapter_key) is AdapterState.READY, seq.request_id
    assert all(not seq.block_ids for seq in sched.waiting)
    holders = Counter(seq.adapter_key for seq in [*sched.running, *sched.waiting] if seq.holds_adapter)
    assert {key: sched.adapters.refcount(key) for key in "uvwxyz"} == {key: holders[key] for key in "uvwxyz"}
    for queue in (sched.running, list(sched.waiting)):  # a group's members side by side, in member order
        i = 0
        while i < len(queue):
            members = queue[i].members
            assert queue[i : i + len(members)] == members, queue[i].request_id
            i += len(members)
    in_use = sum(len(seq.block_ids) for seq in sched.running)
    assert in_use + sched.blocks.num_free_blocks == sched.blocks.num_blocks


def _arrive_loading(
    sched: Scheduler, rng: random.Random, tenants: str, outputs: dict[int, int], loading: set[str], count: int
) -> None:
    """`count` groups and single requests of `tenants` (`outputs`: id of a unit's first sequence -> the
    tokens it generates), their adapters promised as the engine does on arrival (loads into `loading`)."""
    slots, max_seqs = sched.adapters.num_slots, sched.limits.max_num_seqs
    for _ in range(count):
        keys = [rng.choice(["u", "v", "w", "x", "y", "z", None])]
        if rng.random() < 0.3:
            keys = rng.sample(["u", "v", "w", "x", "y", "z", None], rng.randint(2, min(slots, max_seqs)))
        prompt, output = rng.randint(1, 12), rng.randint(1, 10)
        if len(keys) * -(-(prompt + output + 1) // 4) > sched.blocks.num_blocks:
            continue  # the engine refuses a request that could never fit the KV cache
        unit = _group(f"r{len(outputs)}", prompt, keys, rng.choice(tenants))
        outputs[id(unit)] = output
        sched.add(unit)
        loading.update(key for key, _slot in sched.pin_adapters())


def _run_random_trial(rng: random.Random) -> Scheduler:
    """One random run of arrivals, loads that take a few steps or fail, invalidations, prefetches and
    aborts, the invariants checked after every step; returns the scheduler once nothing is left."""
    slots, max_seqs = rng.choice([2, 3, 4]), rng.choice([2, 3, 4, 6, 8])
    sched = Scheduler(
        SchedulerLimits(max_seqs, rng.choice([8, 16, 64])),
        BlockManager(rng.choice([16, 32, 256]), 4),
        AdapterCache(slots, clock=lambda: 1000.0),
    )
    tenants = "abcde"[: rng.randint(2, 5)]
    outputs: dict[int, int] = {}
    loading: set[str] = set()
    _arrive_loading(sched, rng, tenants, outputs, loading, rng.randint(2, 10))
    for step in range(600):
        if not sched.has_unfinished():
            break
        early = step < 60
        if early and rng.random() < 0.3:
            _arrive_loading(sched, rng, tenants, outputs, loading, rng.randint(1, 3))
        if rng.random() < 0.05:  # an invalidation, as the engine applies it
            key = rng.choice("uvwxyz")
            sched.release_waiting(key)
            sched.adapters.invalidate(key)
        if rng.random() < 0.05 and sched.adapters.prefetch(key := rng.choice("uvwxyz")) is not None:
            loading.add(key)
        if early and rng.random() < 0.03 and (sched.running or sched.waiting):
            sched.finish(rng.choice([*sched.running, *sched.waiting]))  # an abort
        batch = sched.schedule()
        loading.update(key for key, _slot in batch.loads)
        _check_invariants(sched, batch)
        for key in sorted(loading):
            if sched.adapters.state(key) is not AdapterState.LOADING:
                loading.discard(key)
                continue
            draw = rng.random()
            if draw < 0.6:
                sched.adapters.mark_ready(key)
                loading.discard(key)
            elif draw < 0.62 and early:
                sched.fail_adapter(key)
                loading.discard(key)
        _advance(batch)
        for seq in list(sched.running):
            if seq.is_leader and seq.num_output_tokens >= outputs[id(seq)]:
                sched.finish(seq)
    return sched


def test_random_steps_with_invalidations_failed_loads_prefetches_and_aborts_keep_every_invariant():
    """Groups and single requests of two to five tenants over 2-4 slots, with loads that take a few
    steps or fail, adapters invalidated while they run or load, prefetches and aborts: after every step
    the running set fits, no sequence runs on an adapter that is not READY in its slot or without its
    reference, reference counts are the holders', groups stay whole and side by side, KV blocks add up,
    no sequence is preempted and run in the same step, and everything runs to its end."""
    rng = random.Random(11)
    for trial in range(300):
        sched = _run_random_trial(rng)
        assert not sched.has_unfinished(), trial
        assert sched.blocks.num_free_blocks == sched.blocks.num_blocks, trial
        assert all(sched.adapters.refcount(key) == 0 for key in "uvwxyz"), trial
