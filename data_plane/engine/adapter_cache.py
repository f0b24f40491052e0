"""AdapterCache: which adapter sits in which device slot, reference counts, LRU eviction, loading state.

Plain Python bookkeeping; the model runner does the copies. An entry is LOADING from `admit` (a slot is
reserved) until `mark_ready`; only READY entries with no reference can be evicted, least recently used
first. Sequences take a reference with `acquire` as soon as they are promised the adapter (even while it
loads) and drop it with `release` when they finish.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class AdapterState(Enum):
    LOADING = "loading"
    READY = "ready"


@dataclass
class _Entry:
    key: str
    slot: int
    state: AdapterState
    refcount: int = 0
    last_used: int = 0


class AdapterCache:
    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError("num_slots must be positive")
        self.num_slots = num_slots
        self._entries: dict[str, _Entry] = {}
        self._free_slots: list[int] = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._clock = 0

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def state(self, key: str) -> AdapterState | None:
        entry = self._entries.get(key)
        return entry.state if entry else None

    def slot_of(self, key: str) -> int | None:
        """The slot of a READY adapter, else None."""
        entry = self._entries.get(key)
        return entry.slot if entry and entry.state is AdapterState.READY else None

    def refcount(self, key: str) -> int:
        entry = self._entries.get(key)
        return entry.refcount if entry else 0

    def resident_keys(self) -> list[str]:
        """Keys of READY adapters, most recently used first."""
        ready = [e for e in self._entries.values() if e.state is AdapterState.READY]
        return [e.key for e in sorted(ready, key=lambda e: -e.last_used)]

    def _victim(self) -> _Entry | None:
        candidates = [e for e in self._entries.values() if e.state is AdapterState.READY and e.refcount == 0]
        return min(candidates, key=lambda e: e.last_used) if candidates else None

    def can_admit(self, key: str) -> bool:
        """True when `key` is present or a slot can be had for it (free, or by evicting an unused one)."""
        return key in self._entries or bool(self._free_slots) or self._victim() is not None

    def admit(self, key: str) -> tuple[int, str | None]:
        """Reserves a slot for `key` in LOADING state; returns (slot, evicted key or None)."""
        if key in self._entries:
            raise ValueError(f"adapter {key!r} is already admitted")
        evicted = None
        if self._free_slots:
            slot = self._free_slots.pop()
        else:
            victim = self._victim()
            if victim is None:
                raise RuntimeError("admit without can_admit: every slot is referenced or loading")
            del self._entries[victim.key]
            slot, evicted = victim.slot, victim.key
        self._entries[key] = _Entry(key, slot, AdapterState.LOADING, last_used=self._tick())
        return slot, evicted

    def mark_ready(self, key: str) -> int:
        entry = self._entries[key]
        entry.state = AdapterState.READY
        entry.last_used = self._tick()
        return entry.slot

    def fail(self, key: str) -> None:
        """Drops a LOADING entry whose load failed and frees its slot (references go with it)."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._free_slots.append(entry.slot)

    def acquire(self, key: str) -> None:
        entry = self._entries[key]
        entry.refcount += 1
        entry.last_used = self._tick()

    def release(self, key: str) -> None:
        entry = self._entries.get(key)
        if entry is None:  # dropped by `fail`
            return
        if entry.refcount <= 0:
            raise RuntimeError(f"release of adapter {key!r} without a reference")
        entry.refcount -= 1
        entry.last_used = self._tick()

    def prefetch(self, key: str) -> int | None:
        """Starts bringing `key` in without a reference; returns the slot to load, or None when it is
        already present or no slot can be had."""
        if key in self._entries or not self.can_admit(key):
            return None
        slot, _ = self.admit(key)
        return slot

    def evict(self, key: str) -> bool:
        """Frees the slot of an unreferenced READY adapter; False when it is absent, loading or in use."""
        entry = self._entries.get(key)
        if entry is None or entry.state is not AdapterState.READY or entry.refcount:
            return False
        del self._entries[key]
        self._free_slots.append(entry.slot)
        return True
