"""Scheduler: continuous batching with chunked prefill, KV and adapter-slot admission, preemption.

Each step gives every running sequence its pending tokens (one for decode, a chunk of prompt for
prefill) within `max_num_batched_tokens`; when KV blocks run out, the most recently admitted running
sequence is preempted by recompute (its blocks freed, its tokens to be prefilled again). Waiting
sequences are admitted while sequences, tokens and blocks allow, fairly across tenants
(`Sequence.tenant`): the next one is the earliest waiting request of the tenant with the fewest running
requests, so one tenant's flood queues behind its own work, not ahead of everyone's (with one tenant this
is arrival order). One whose adapter is still loading is passed over so that the others keep running.

Fair share of the running set. With more than one tenant at work, each tenant's share is
`max_num_seqs // tenants` running sequences (tenants running or waiting). Work-conserving: a tenant may
run past its share while nobody else waits. When a tenant below its share waits and its adapter finds
every slot held, the slot of an adapter held only by sequences of tenants above their share is freed by
preempting them by recompute (an ensemble's group whole), and promised to it at once (`_rebalance_slots`).
Then, adapters promised, the newest running units of the tenant furthest above its share are preempted to
make room for the waiting units owed it (`_owed_units`: of tenants below their share, none waiting for a
slot it does not hold), and no more (`_make_room`). Admission keeps that room for them, so a flood cannot
take back what was freed while an adapter loads, and no unit preempted for them is taken in again in the
same step, its whole context computed again for nothing.
Slot share: with every slot held, a tenant holding fewer than `num_slots // tenants` adapter slots whose
waiting request needs an absent adapter gets the slot of one held only by tenants holding more than that
(its running holders preempted, an ensemble's group whole), promised to it at once (`_share_slots`); a
waiting ensemble's group gets the slots of all its absent adapters at once, within that share, or none.
Adapter slots are promised to waiting work in the same fair order. The step's token budget is shared the
same way: while the first waiting unit in fair order could run, the running prefill chunks of tenants
running more units than its tenant leave its first chunk room in the step (at most half the budget), so a
flood of long prompts within its share delays another tenant's first token by one step, not by every
prompt in flight. With one tenant none of this applies.

Every sequence with an adapter holds one reference on it in the adapter cache from the moment it is
promised a slot (while waiting) or admitted, until it finishes, preemption included: a referenced
adapter never leaves its slot, so every running sequence's adapter stays READY in its slot.

An invalidated adapter retires (see AdapterCache): running sequences finish on its slot; waiting ones
give their reference back (`release_waiting`, and on preemption) and wait for a fresh load of it.

An ensemble's K sequences (a group, `Sequence.group`) are one unit: admitted together once every member's
adapter is usable and K times the tokens and the blocks fit, run together with the same number of tokens,
preempted together and finished together, never half a group in a step. Its members sit next to each other
in `waiting` and in `running`, in member order.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from data_plane.engine.adapter_cache import AdapterCache, AdapterState
from data_plane.engine.block_manager import BlockManager
from data_plane.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerLimits:
    max_num_seqs: int
    max_num_batched_tokens: int


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # tokens each sequence runs this step
    preempted: list[Sequence] = field(default_factory=list)
    loads: list[tuple[str, int]] = field(default_factory=list)  # (adapter key, slot) to load now

    @property
    def is_empty(self) -> bool:
        return not self.seqs


def _num_leaders(seqs: deque[Sequence] | list[Sequence]) -> int:
    """The units among `seqs`, counted on a copy taken in one call (no other thread runs during it): the
    worker's gauges and each call's queue check count from other threads, and iterating the deque itself
    raised "deque mutated during iteration" whenever the engine thread changed it meanwhile."""
    return sum(1 for seq in tuple(seqs) if seq.is_leader)


class Scheduler:
    def __init__(self, limits: SchedulerLimits, blocks: BlockManager, adapters: AdapterCache) -> None:
        self.limits = limits
        self.blocks = blocks
        self.adapters = adapters
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._promised_loads: list[tuple[str, int]] = []  # loads promised by _share_slots, for pin_adapters

    @property
    def num_waiting(self) -> int:
        """Waiting requests (an ensemble's group counts once); safe to read from any thread."""
        return _num_leaders(self.waiting)

    @property
    def num_running(self) -> int:
        """Running requests (an ensemble's group counts once); safe to read from any thread."""
        return _num_leaders(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        """Queues a sequence, or a whole group given its first member."""
        for member in seq.members:
            member.status = SequenceStatus.WAITING
            self.waiting.append(member)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        share = self._fair_share()
        if share is not None:
            batch.preempted.extend(self._rebalance_slots(share))
        # Adapters are promised before room is made: which waiting units the room is for depends on them.
        batch.loads.extend(self.pin_adapters())
        owed = self._owed_units(share) if share is not None else []
        if owed:
            batch.preempted.extend(self._make_room(share, owed))
        budget = self.limits.max_num_batched_tokens
        yield_to, held_back = self._prefill_room(share, budget)
        running_units = Counter(seq.tenant for seq in self.running if seq.is_leader) if held_back else None
        index = 0
        kv_pressure = False
        while index < len(self.running) and budget > 0:
            unit = self.running[index].members
            num_new = min(unit[0].num_pending_tokens, budget // len(unit))
            if held_back and num_new > 1 and running_units[unit[0].tenant] > running_units[yield_to]:
                # A prefill chunk of a tenant running more than the one whose request waits first: it
                # leaves that request's first chunk room in this step.
                num_new = min(num_new, (budget - held_back) // len(unit))
                if num_new < 1:
                    index += len(unit)
                    continue
            if num_new < 1:
                break  # a group runs whole or not at all
            while not self._can_allocate(unit, num_new):
                victim = self._pop_kv_victim(index, share)
                self._preempt_unit(victim)
                batch.preempted.extend(victim)
                kv_pressure = True
                if victim[0] is unit[0]:
                    break
            if unit[0].status is not SequenceStatus.RUNNING:
                break
            self._allocate(batch, unit, num_new)
            budget -= num_new * len(unit)
            index += len(unit)

        if kv_pressure:
            return batch  # under KV pressure: admit nothing new this step
        # The room the owed units need is kept for them (it is what `_make_room` made): a unit owed none
        # takes only the room beyond, so that none preempted for them is taken in again at once.
        owed_ids = {id(unit[0]) for unit in owed}
        reserved = sum(len(unit) for unit in owed)
        for unit in self._fair_order():
            if len(self.running) + len(unit) > self.limits.max_num_seqs or budget <= 0:
                break
            is_owed = id(unit[0]) in owed_ids
            if not is_owed and len(self.running) + len(unit) > self.limits.max_num_seqs - reserved:
                continue  # the room left is kept for tenants below their share
            if any(s.adapter_key is not None and not self.adapters.is_usable(s.adapter_key) for s in unit):
                continue  # its adapter is loading, retiring or waits for a slot: let the others go first
            num_new = min(unit[0].num_pending_tokens, budget // len(unit))
            if num_new < 1 or not self._can_allocate(unit, num_new):
                break
            if is_owed:
                reserved -= len(unit)
            for seq in unit:
                # A READY adapter may have been promised to (or prefetched for) another sequence only: take
                # a reference of our own, or its slot could be evicted under us once that one finishes.
                self._hold_adapter(seq)
                self.waiting.remove(seq)
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
            self._allocate(batch, unit, num_new)
            budget -= num_new * len(unit)
        return batch

    def _prefill_room(self, share: int | None, budget: int) -> tuple[str, int]:
        """(tenant, tokens): with several tenants at work, the first waiting unit in fair order that could
        run now (its adapters usable, room in the running set) and the tokens of its first chunk, at most
        half of `budget`; running prefill chunks of tenants running more units than that tenant leave them
        free. ("", 0) when there is none, or one tenant."""
        if share is None:
            return "", 0
        unit = next(self._fair_order(), None)
        if (
            unit is None
            or len(self.running) + len(unit) > self.limits.max_num_seqs
            or any(s.adapter_key is not None and not self.adapters.is_usable(s.adapter_key) for s in unit)
        ):
            return "", 0
        tokens = min(unit[0].num_pending_tokens, budget // 2 // len(unit))
        if tokens < 1 or not self._can_allocate(unit, tokens):
            return "", 0  # it could not be admitted this step: nothing is held back for it
        return unit[0].tenant, tokens * len(unit)

    def _fair_share(self) -> int | None:
        """Running sequences per tenant while more than one tenant has work; None with one (or none)."""
        tenants = {seq.tenant for seq in self.running} | {seq.tenant for seq in self.waiting}
        if len(tenants) < 2:
            return None
        return max(1, self.limits.max_num_seqs // len(tenants))

    def _below_share_units(self, share: int, running: Counter[str]) -> Iterator[list[Sequence]]:
        """The waiting units that fit their tenant's share, in queue order, each counted (in `running`,
        which it updates) as if admitted, so that a tenant's later units see its earlier ones."""
        for unit in self._waiting_units():
            tenant = unit[0].tenant
            if running[tenant] + len(unit) <= share:
                running[tenant] += len(unit)
                yield unit

    def _owed_units(self, share: int) -> list[list[Sequence]]:
        """The waiting units owed room in the running set this step, in queue order: those of tenants below
        `share`, each counted as its tenant's (a group by its sequences), so that a tenant's later units
        see its earlier ones. One rule for `_make_room`, which makes their room, and for the admission,
        which keeps it for them: room made for a unit that the admission did not keep went to a unit just
        preempted for it, taken in again at once, its whole context computed again. A unit waiting for a
        slot for an adapter it does not hold is owed none and does not count: it cannot run before a slot
        frees, and the room kept for it kept out the group holding the slots it waits for (above its share:
        nothing ran, for ever)."""
        running = Counter(seq.tenant for seq in self.running)
        owed = []
        for unit in self._waiting_units():
            if any(
                s.adapter_key is not None
                and not s.holds_adapter
                and self.adapters.state(s.adapter_key) is None
                for s in unit
            ):
                continue
            tenant = unit[0].tenant
            if running[tenant] + len(unit) <= share:
                running[tenant] += len(unit)
                owed.append(unit)
        return owed

    def _rebalance_slots(self, share: int) -> list[Sequence]:
        """With every slot held, frees slots for the absent adapters of waiting units of tenants below
        `share`, held only by tenants above it (`_free_slots`), and for tenants below their share of the
        slots (`_share_slots`). A unit that slots are freed for is promised them at once. Returns the
        preempted sequences."""
        running = Counter(seq.tenant for seq in self.running)
        preempted: list[Sequence] = []
        # Only holders of tenants above `share` give up slots here, and counts only fall in this pass:
        # once none is above it, no unit behind looks for a slot to free (each look walks every running
        # and waiting sequence: 1,024 tenants waiting for adapters of their own, 0.2 s per step).
        any_above = max(running.values(), default=0) > share
        for unit in list(self._below_share_units(share, running)):
            if not any_above:
                break
            _, wanted = self._slots_wanted(unit)
            if not wanted:
                continue
            freed, gave = self._free_slots(
                wanted,
                self._adapter_keys(unit),
                running,
                lambda holder_tenants, _gave, taken: self._above_share(share, running, taken, holder_tenants),
            )
            preempted.extend(freed)
            if gave:
                # Left to `pin_adapters`, the freed slots could go unpromised (a group ahead in fair order
                # keeps the slots that free up for itself), their adapters still in them: the holders just
                # preempted were taken in again at once.
                self._promised_loads.extend(self._promise(unit))
                any_above = max(running.values(), default=0) > share
        preempted.extend(self._share_slots(share, running))
        return preempted

    def _make_room(self, share: int, owed: list[list[Sequence]]) -> list[Sequence]:
        """Preempts (by recompute) the newest running units of the tenants furthest above `share` until the
        `owed` units have room in the running set, or none is above it. Returns the preempted sequences."""
        running = Counter(seq.tenant for seq in self.running)
        needed = sum(len(unit) for unit in owed) - (self.limits.max_num_seqs - len(self.running))
        victims: list[list[Sequence]] = []
        while needed > 0:
            victim = self._newest_unit_above(share, running, victims)
            if victim is None:
                break
            victims.append(victim)
            running[victim[0].tenant] -= len(victim)
            needed -= len(victim)
        # A victim that fits the room made beyond the need (a group taken last) keeps running, the one left
        # with the fewest running first: the admission gives that room to units owed none, and would
        # have taken it in again at once. Each victim left is larger than that room.
        spare = -needed
        while fitting := [victim for victim in victims if len(victim) <= spare]:
            kept = min(fitting, key=lambda victim: running[victim[0].tenant])
            victims.remove(kept)
            running[kept[0].tenant] += len(kept)
            spare -= len(kept)
        preempted: list[Sequence] = []
        for victim in victims:
            for seq in victim:
                self.running.remove(seq)
            self._preempt_unit(victim)
            preempted.extend(victim)
        return preempted

    def _share_slots(self, share: int, running: Counter[str]) -> list[Sequence]:
        """Slot share: with every slot held, the first waiting unit of each tenant holding fewer slots than
        `num_slots // tenants` that waits for an absent adapter, and could run once it has it, gets the slot
        of an adapter held only by tenants holding more slots than that (their holders preempted, a group
        whole). Without it a tenant within its share of the running set could hold every slot with as many
        distinct adapters, and another tenant's adapter request would wait for one of its streams to end.
        Returns the preempted sequences."""
        tenants = {seq.tenant for seq in self.running} | {seq.tenant for seq in self.waiting}
        slot_share = max(1, self.adapters.num_slots // len(tenants))
        slots = self._slots_held()
        preempted: list[Sequence] = []
        if max(slots.values(), default=0) <= slot_share:
            # No tenant holds a slot it may give up, and none comes to (a taker stays within the share):
            # no unit looks for one.
            return preempted
        seen: set[str] = set()
        for unit in self._fair_order():
            tenant = unit[0].tenant
            if tenant in seen:
                continue
            seen.add(tenant)
            # An ensemble's group takes the slots it needs all at once, the adapters it will hold within its
            # tenant's share, or none: it is promised them whole (`_promise`).
            to_hold, wanted = self._slots_wanted(unit)
            if not wanted or slots[tenant] + to_hold > slot_share:
                continue
            fits = (
                running[tenant] + len(unit) <= share
                or len(self.running) + len(unit) <= self.limits.max_num_seqs
            )
            if not fits:
                continue
            freed, gave = self._free_slots(
                wanted,
                self._adapter_keys(unit),
                running,
                lambda holder_tenants, gave, _taken, taker=tenant: all(
                    t != taker and slots[t] - gave[t] > slot_share for t in holder_tenants
                ),
            )
            slots.subtract(gave)
            preempted.extend(freed)
            if gave:
                # Promised now: in fair order the preempted units (now running nothing) could come first
                # and take the adapters they just gave up back.
                self._promised_loads.extend(self._promise(unit))
                slots[tenant] += to_hold
        return preempted

    def _promise(self, unit: list[Sequence], admit: bool = True) -> list[tuple[str, int]]:
        """Takes the references of `unit` on its adapters, admitting absent ones where a slot can be had
        (none with `admit` False: only adapters already in a slot are taken); returns the (adapter key,
        slot) loads to start. An ensemble's group is promised whole or not at all: holding some of its
        adapters while waiting for a slot for the others, two groups could each hold what the other waits
        for, every slot taken and nothing running, for ever."""
        if len(unit) > 1 and not self._can_promise_whole(unit, admit):
            for seq in unit:  # a part it still holds (its other adapters' slots were freed) goes back too
                if seq.holds_adapter and seq.adapter_key is not None:
                    self.adapters.release(seq.adapter_key)
                    seq.holds_adapter = False
            return []
        loads = []
        # Adapters already in a slot are held first, so that admitting the absent ones evicts none of them.
        for seq in sorted(
            unit, key=lambda s: s.adapter_key is None or self.adapters.state(s.adapter_key) is None
        ):
            key = seq.adapter_key
            if key is None or seq.holds_adapter or self.adapters.is_retiring(key):
                continue  # a retiring adapter takes no new reference: wait until it has left its slot
            if self.adapters.state(key) is None:
                if not admit or not self.adapters.can_admit(key):
                    continue
                slot, _ = self.adapters.admit(key)
                loads.append((key, slot))
            self._hold_adapter(seq)
        return loads

    def _can_promise_whole(self, unit: list[Sequence], admit: bool = True) -> bool:
        """True when every adapter of `unit` that it does not hold yet can be had now: none retiring, and a
        slot for each absent one that evicts none of the unit's (none absent when `admit` is False)."""
        keys = {s.adapter_key for s in unit if s.adapter_key is not None and not s.holds_adapter}
        if any(self.adapters.is_retiring(key) for key in keys):
            return False
        absent = [key for key in keys if self.adapters.state(key) is None]
        if not absent:
            return True
        if not admit:
            return False
        return len(absent) <= self.adapters.num_admittable(self._adapter_keys(unit))

    def _slots_held(self) -> Counter[str]:
        """Per tenant, the distinct adapters its sequences hold a reference on (running or promised)."""
        held = {(seq.tenant, seq.adapter_key) for seq in (*self.running, *self.waiting) if seq.holds_adapter}
        return Counter(tenant for tenant, key in held if key is not None)

    def _slots_wanted(self, unit: list[Sequence]) -> tuple[int, int]:
        """(to_hold, wanted): the adapters `unit` does not hold yet, and how many of those in no slot find
        none that `admit` could hand out now without evicting one of the unit's ((0, 0) when none is absent,
        or while one is retiring: its slot comes free as its holders finish)."""
        keys = {s.adapter_key for s in unit if s.adapter_key is not None and not s.holds_adapter}
        if any(self.adapters.is_retiring(key) for key in keys):
            return 0, 0
        absent = sum(1 for key in keys if self.adapters.state(key) is None)
        if not absent:
            return 0, 0
        return len(keys), max(0, absent - self.adapters.num_admittable(self._adapter_keys(unit)))

    @staticmethod
    def _adapter_keys(unit: list[Sequence]) -> set[str]:
        return {s.adapter_key for s in unit if s.adapter_key is not None}

    def _newest_unit_above(
        self, share: int, running: Counter[str], taken: list[list[Sequence]]
    ) -> list[Sequence] | None:
        """The most recently admitted running unit, none of `taken`, of the tenant furthest above `share`
        (`running`: its running sequences, less those of `taken`), or None."""
        tenant, count = max(running.items(), key=lambda item: item[1], default=("", 0))
        if count <= share:
            return None
        taken_ids = {id(unit[0]) for unit in taken}
        for seq in reversed(self.running):
            if seq.tenant == tenant and id(seq.members[0]) not in taken_ids:
                return seq.members
        return None

    @staticmethod
    def _above_share(
        share: int, running: Counter[str], taken: Counter[str], holder_tenants: Counter[str]
    ) -> bool:
        """The sequence-share rule of `_free_slots`: every holder's tenant runs more than `share` (its
        `running` sequences less those `taken` before), and preempting its running holders
        (`holder_tenants`: tenant -> running sequences preempted) takes none of them below it. Read per
        holding tenant: `running - taken` made a counter of every tenant for each adapter looked at, and
        each waiting unit looks (1,024 tenants waiting: 0.5 s per step)."""
        return all(
            running[t] - taken[t] > share and running[t] - taken[t] - n >= share
            for t, n in holder_tenants.items()
        )

    def _free_slots(
        self,
        count: int,
        keep: set[str],
        running: Counter[str],
        may_take: Callable[[Counter[str], Counter[str], Counter[str]], bool],
    ) -> tuple[list[Sequence], Counter[str]]:
        """Frees the slots of `count` READY adapters, none of `keep`, whose holders `may_take` allows, or of
        none when fewer can be freed (an ensemble's group is promised its slots whole: a part freed for it
        would go back to the units preempted for it, to be taken again at the next step). One by one, the
        adapter with the fewest running holders: its running holders are preempted, an ensemble's whole
        group with them, and every holder drops its reference, so that the adapter can be evicted (a retiring
        one leaves its slot).
        `may_take` is called with each holding tenant's count of running sequences that would be preempted
        (zero for a tenant whose holders all wait), and, per tenant, the slots and the running sequences
        that the adapters chosen before take from it. Returns the preempted sequences and, per tenant, the
        adapters it held of those freed."""
        holders: dict[str, list[Sequence]] = {}
        for seq in (*self.running, *self.waiting):
            if seq.holds_adapter and seq.adapter_key is not None:
                holders.setdefault(seq.adapter_key, []).append(seq)
        chosen: list[str] = []
        gave: Counter[str] = Counter()
        taken: Counter[str] = Counter()
        stopped: set[int] = set()  # ids of the running units that the adapters chosen so far preempt
        while len(chosen) < count:
            best: tuple[int, int, str] | None = None
            best_preempted: Counter[str] = Counter()
            for key, seqs in holders.items():
                if (
                    key in chosen
                    or key in keep
                    or self.adapters.refcount(key) != len(seqs)
                    or self.adapters.state(key) is not AdapterState.READY
                ):
                    # Chosen, kept, referenced beyond these sequences, or its slot is being written. A
                    # retiring one is a candidate: its slot comes free as its holders stop, and passed
                    # over, it came free anyway when they held the adapter chosen instead, that adapter
                    # left unused in its slot and its holders just preempted taken in again at once.
                    continue
                units = {id(seq.members[0]): seq.members for seq in seqs}
                preempted_per_tenant = Counter({seq.tenant: 0 for seq in seqs})
                for unit_id, unit in units.items():
                    if unit[0].status is SequenceStatus.RUNNING and unit_id not in stopped:
                        preempted_per_tenant.update(seq.tenant for seq in unit)
                if not may_take(preempted_per_tenant, gave, taken):
                    continue
                candidate = (preempted_per_tenant.total(), len(seqs), key)
                if best is None or candidate < best:
                    best, best_preempted = candidate, preempted_per_tenant
            if best is None:
                return [], Counter()
            key = best[2]
            chosen.append(key)
            gave.update({seq.tenant for seq in holders[key]})
            taken.update(best_preempted)
            stopped.update(id(seq.members[0]) for seq in holders[key] if seq.status is SequenceStatus.RUNNING)
        preempted: list[Sequence] = []
        for key in chosen:
            for unit in {id(seq.members[0]): seq.members for seq in holders[key]}.values():
                if unit[0].status is SequenceStatus.RUNNING:
                    for seq in unit:
                        self.running.remove(seq)
                        running[seq.tenant] -= 1
                    self._preempt_unit(unit)
                    preempted.extend(unit)
            for seq in holders[key]:
                if seq.holds_adapter:  # a retiring entry's holder gave it back in _preempt
                    self.adapters.release(key)
                    seq.holds_adapter = False
        return preempted, gave

    def _waiting_units(self) -> list[list[Sequence]]:
        """The waiting sequences as units (a sequence, or a whole group), in queue order."""
        return [seq.members for seq in self.waiting if seq.is_leader]

    def _fair_order(self) -> Iterator[list[Sequence]]:
        """The waiting units in fair order: each next one is the earliest of the tenant with the fewest
        running requests, counting the units yielded before it as its tenant's (admitted, promised, or
        passed over this pass). Queue order when one tenant waits."""
        queues: dict[str, deque[tuple[int, list[Sequence]]]] = {}
        for position, unit in enumerate(self._waiting_units()):
            queues.setdefault(unit[0].tenant, deque()).append((position, unit))
        if len(queues) == 1:
            for _, unit in next(iter(queues.values())):
                yield unit
            return
        counts = Counter(s.tenant for s in self.running if s.is_leader)
        # Each waiting tenant once, by (its running units, the position of its earliest waiting unit): a
        # tenant's entry changes only when its unit is taken. Taking the least of every tenant's anew for
        # each unit cost a pass over the tenants per unit, and the schedule takes every unit of the queue
        # (1,024 requests of 256 tenants: 0.1 s per step, every running stream's tokens waiting on it).
        heap = [(counts[tenant], units[0][0], tenant) for tenant, units in queues.items()]
        heapq.heapify(heap)
        while heap:
            count, _, tenant = heapq.heappop(heap)
            units = queues[tenant]
            _, unit = units.popleft()
            if units:
                heapq.heappush(heap, (count + 1, units[0][0], tenant))
            yield unit

    def _can_allocate(self, unit: list[Sequence], num_new_tokens: int) -> bool:
        """True when `num_new_tokens` more tokens of every sequence of `unit` fit the free blocks at once."""
        needed = sum(self.blocks.blocks_needed(seq, num_new_tokens) for seq in unit)
        return needed <= self.blocks.num_free_blocks

    def _allocate(self, batch: ScheduledBatch, unit: list[Sequence], num_new_tokens: int) -> None:
        for seq in unit:
            self.blocks.allocate(seq, num_new_tokens)
            batch.seqs.append(seq)
            batch.num_tokens.append(num_new_tokens)

    def _pop_last_running_unit(self) -> list[Sequence]:
        """Takes the most recently admitted unit off `running` (a group's members are its last entries)."""
        unit = self.running[-1].members
        del self.running[-len(unit) :]
        return unit

    def _pop_kv_victim(self, first: int, share: int | None) -> list[Sequence]:
        """Takes the unit to preempt for KV room off `running`, from the units at `first` and after (those
        not yet scheduled this step, the one at `first` included): with one tenant the most recently
        admitted; with several, the most recently admitted of the tenant holding the most KV blocks among
        those that have one there, so that one tenant's long contexts evict its own work, not a
        neighbour's."""
        if share is None:
            return self._pop_last_running_unit()
        held: Counter[str] = Counter()
        for seq in self.running:
            held[seq.tenant] += len(seq.block_ids)
        newest: dict[str, tuple[int, list[Sequence]]] = {}  # tenant -> (position, its newest unit there)
        for position in range(first, len(self.running)):
            seq = self.running[position]
            if seq.is_leader:
                newest[seq.tenant] = (position, seq.members)
        # Ties go to the more recently admitted unit, as with one tenant.
        _, unit = max((held[tenant], *entry) for tenant, entry in newest.items())[1:]
        for seq in unit:
            self.running.remove(seq)
        return unit

    def pin_adapters(self) -> list[tuple[str, int]]:
        """Promises adapters to the first waiting units in fair order (the next `max_num_seqs`), reserving slots for
        absent ones; returns the (adapter key, slot) loads to start. Each step does it; the engine also
        does it when a request arrives, so that its adapter's load starts at once."""
        loads, self._promised_loads = self._promised_loads, []
        reserving = False
        for unit in itertools.islice(self._fair_order(), self.limits.max_num_seqs):
            loads.extend(self._promise(unit, admit=not reserving))
            # The first group that cannot have its slots whole keeps the slots that free up for itself:
            # the units after it take adapters already in a slot only. Else a stream of requests for other
            # absent adapters took each freed slot first, and the group waited as long as they kept coming.
            if len(unit) > 1 and any(s.adapter_key is not None and not s.holds_adapter for s in unit):
                reserving = True
        return loads

    def _hold_adapter(self, seq: Sequence) -> None:
        """Takes the reference of `seq` on its adapter (an admitted entry), once for its whole life."""
        if seq.adapter_key is not None and not seq.holds_adapter:
            self.adapters.acquire(seq.adapter_key)
            seq.holds_adapter = True

    def _preempt(self, seq: Sequence) -> None:
        if seq.holds_adapter and seq.adapter_key is not None and self.adapters.is_retiring(seq.adapter_key):
            # It starts over anyway: let the retiring slot go and wait for the adapter's fresh load.
            self.adapters.release(seq.adapter_key)
            seq.holds_adapter = False
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _preempt_unit(self, unit: list[Sequence]) -> None:
        for seq in reversed(unit):  # each goes to the front of `waiting`: the unit keeps its order
            self._preempt(seq)

    def finish(self, seq: Sequence) -> None:
        """Removes a sequence (finished or aborted) with the rest of its group, and returns their blocks and
        adapter references."""
        for member in seq.members:
            self._finish_one(member)

    def _finish_one(self, seq: Sequence) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        self.blocks.free(seq)
        if seq.holds_adapter and seq.adapter_key is not None:
            self.adapters.release(seq.adapter_key)
            seq.holds_adapter = False

    def release_waiting(self, key: str) -> None:
        """`key` was invalidated: waiting sequences give back their reference on it (each will be promised
        a fresh load), so that only running sequences keep the old entry until they finish."""
        for seq in self.waiting:
            if seq.adapter_key == key and seq.holds_adapter:
                self.adapters.release(key)
                seq.holds_adapter = False

    def fail_adapter(self, key: str) -> list[Sequence]:
        """The load of `key` failed: drops its entry and removes every unit that waits for it (a group with
        all its members); returns the first sequence of each such unit."""
        failed = [unit for unit in self._waiting_units() if any(s.adapter_key == key for s in unit)]
        for unit in failed:
            for seq in unit:
                if seq.adapter_key == key:
                    seq.holds_adapter = False  # its reference goes with the entry
            self.finish(unit[0])
        self.adapters.fail(key)
        return [unit[0] for unit in failed]
