"""Scheduler: continuous batching with chunked prefill, KV and adapter-slot admission, preemption.

Each step gives every running sequence its pending tokens (one for decode, a chunk of prompt for
prefill) within `max_num_batched_tokens`; when KV blocks run out, the most recently admitted running
sequence is preempted by recompute (its blocks freed, its tokens to be prefilled again). Waiting
sequences are admitted in arrival order while sequences, tokens and blocks allow; one whose adapter
is still loading is passed over so that the others keep running.

Every sequence with an adapter holds one reference on it in the adapter cache from the moment it is
promised a slot (while waiting) or admitted, until it finishes, preemption included: a referenced
adapter never leaves its slot, so every running sequence's adapter stays READY in its slot.

An invalidated adapter retires (see AdapterCache): running sequences finish on its slot; waiting ones
give their reference back (`release_waiting`, and on preemption) and wait for a fresh load of it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from data_plane.engine.adapter_cache import AdapterCache
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


class Scheduler:
    def __init__(self, limits: SchedulerLimits, blocks: BlockManager, adapters: AdapterCache) -> None:
        self.limits = limits
        self.blocks = blocks
        self.adapters = adapters
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.limits.max_num_batched_tokens
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_new = min(seq.num_pending_tokens, budget)
            while not self.blocks.can_allocate(seq, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break
            self.blocks.allocate(seq, num_new)
            batch.seqs.append(seq)
            batch.num_tokens.append(num_new)
            budget -= num_new
            index += 1

        self._pin_adapters(batch)
        if batch.preempted:
            return batch  # under KV pressure: admit nothing new this step
        for seq in list(self.waiting):
            if len(self.running) >= self.limits.max_num_seqs or budget <= 0:
                break
            if seq.adapter_key is not None and not self.adapters.is_usable(seq.adapter_key):
                continue  # its adapter is loading, retiring or waits for a slot: let the others go first
            num_new = min(seq.num_pending_tokens, budget)
            if not self.blocks.can_allocate(seq, num_new):
                break
            self.blocks.allocate(seq, num_new)
            # A READY adapter may have been promised to (or prefetched for) another sequence only: take a
            # reference of our own, or its slot could be evicted under us once that one finishes.
            self._hold_adapter(seq)
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_tokens.append(num_new)
            budget -= num_new
        return batch

    def _pin_adapters(self, batch: ScheduledBatch) -> None:
        """Promises adapters to the first waiting sequences, starting loads for absent ones."""
        for seq in list(self.waiting)[: self.limits.max_num_seqs]:
            key = seq.adapter_key
            if key is None or seq.holds_adapter or self.adapters.is_retiring(key):
                continue  # a retiring adapter takes no new reference: wait until it has left its slot
            if self.adapters.state(key) is None:
                if not self.adapters.can_admit(key):
                    continue
                slot, _ = self.adapters.admit(key)
                batch.loads.append((key, slot))
            self._hold_adapter(seq)

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

    def finish(self, seq: Sequence) -> None:
        """Removes a sequence (finished or aborted) and returns its blocks and adapter reference."""
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
        """The load of `key` failed: drops its entry and removes every sequence that waits for it."""
        failed = [s for s in self.waiting if s.adapter_key == key]
        for seq in failed:
            seq.holds_adapter = False
            self.finish(seq)
        self.adapters.fail(key)
        return failed
