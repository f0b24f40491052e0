"""AdapterCache: adapters in tiers (device slots, host memory), reference counts, cost-based eviction.

Plain Python bookkeeping; the loader and model runner move the bytes. Tiers, fastest first:

- device: a slot of the LoRA pools. An entry is LOADING from `admit` (a slot is reserved) until
  `mark_ready`; only READY entries with no reference can leave a slot.
- host: one contiguous (pinned on CUDA) buffer per adapter, within `host_budget_bytes`. An entry being
  copied from host into a slot cannot leave host memory; keep-warm entries never do.
- below that the disk (the worker's artifact store) and the control plane, which this class does not hold.

Eviction is by expected cost, not recency. A slot's victim is the evictable entry with the lowest
    predicted_reuse (requests/s) x reload_cost_ms (to bring it back from the tier below),
ties going to the least recently used. Predicted reuse is an exponentially weighted request rate per key
(updated on each `acquire`, time constant `rate_time_constant_s`), raised while a prewarm hint's deadline
is ahead. Reload cost is size_bytes over the measured throughput of the tier below (`record_load`), plus
a fixed per-load overhead, or, once measured and when more, how much longer the requests served from that
tier waited for their first step than those whose adapter was in a slot (`record_wait`): a copy from host
memory begins on a request's arrival and mostly ends within the running step, so a slot with a host copy
behind it costs its next call little, while a read from disk more often costs it a step.

Usage statistics outlive residency, so an adapter evicted and called again keeps its history, within a
bound: at most `max_idle_usage_records` (MAX_IDLE_USAGE_RECORDS, 10,000 by default) keys in no tier keep
theirs. Past it, the records with the lowest long-horizon predicted reuse go first (the least recently
used among equals), down to three quarters of the bound; a key kept warm or protected by a prewarm hint
keeps its record. Every distinct linear mix (its members and weights) is a key of its own, so without the
bound a tenant calling one mix with ever new weights grew them forever.

Host memory holds many more adapters, most of them long-tail ones called at random times; a request rate
over a minute says nothing about an adapter called once an hour. Its entries are ranked by expected reuse
value per byte,
    host_value = long_reuse (requests/s) x reload_cost_ms (from disk) / size_bytes,
where long_reuse is a second request rate with a long time constant (`long_rate_time_constant_s`, a day
by default: close to the number of calls in the last day), plus the prewarm term. The least valuable
entries make room first, and an unprotected adapter takes the room of none more valuable per byte than
itself, so under memoryless traffic the adapters most likely to be called stay.

The cache is the one owner of the host tier: an entry holds its host buffer (an opaque object from the
loader) with its size, so dropping the entry drops the bytes. The engine thread alone mutates the cache;
other threads read `residency`, an immutable snapshot replaced (one attribute store) after every change.

Invalidation (`invalidate`) drops the host copy at once and frees an unused slot. An entry still
referenced by running sequences, or whose slot is being written, is *retiring*: it serves the sequences
that hold it (they finish on the slot they run on; the content is the same sha256 they were authorised
for) but takes no new reference, and leaves its slot when the last holder releases it or its load ends.
A new request for the key then gets a fresh entry, loaded from disk.

A prewarm hint protects its adapter until the predicted call comes (its next use) or the hint's window
ends: the deadline plus as long again as the hint's lead (at least `min_prewarm_grace_s`), for a late
call. Protected entries go last, from host memory and from slots, and only to make room for an entry
expected to be needed sooner; a demote leaves them alone. Without this, the next prewarm of the long tail
would evict the previous one (its deadline still ahead) before its call.

Prefetches are accounted: a copy brought into a tier by a prefetch (`prefetch` into a slot,
`store_host(..., prefetched=True)` into host memory) that leaves that tier before any request took a
reference on it is counted in `wasted_prefetches` (by tier), so an operator can tell hints that cost
loads for nothing from hints that land.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

log = logging.getLogger(__name__)

DEVICE = "device"
HOST = "host"
DISK = "disk"


class AdapterState(Enum):
    LOADING = "loading"
    READY = "ready"


@dataclass
class TierCost:
    """What one load from a tier costs: fixed_ms + size_bytes / bytes_per_ms (a measured average)."""

    bytes_per_ms: float
    fixed_ms: float

    def load_ms(self, size_bytes: int) -> float:
        return self.fixed_ms + size_bytes / self.bytes_per_ms


# Starting guesses (replaced by measurements as loads complete): host->slot copies run at memory speed,
# disk loads pay for reading, validation and packing.
DEFAULT_TIER_COSTS = {
    HOST: TierCost(bytes_per_ms=2e6, fixed_ms=0.05),
    DISK: TierCost(bytes_per_ms=2e5, fixed_ms=2.0),
}
# Keep-warm host copies never leave the host tier up to this share of its budget (oldest first).
KEEP_WARM_SHARE = 0.5
# Usage records kept for keys in no tier (see the module docstring).
MAX_IDLE_USAGE_RECORDS = 10_000
_MEASURE_WEIGHT = 0.2  # weight of a new measurement in the throughput average
# Requests whose adapter came from a tier, measured before that tier's wait counts (`record_wait`), and the
# weight of a new one in its average.
MIN_WAIT_SAMPLES = 16
_WAIT_WEIGHT = 0.05


@dataclass
class _Usage:
    """Per-key demand, kept while the key is in no tier."""

    rate_per_s: float = 0.0  # EWMA request rate as of rate_at_s
    long_rate_per_s: float = 0.0  # the same with the long time constant (host-tier ranking)
    rate_at_s: float = 0.0
    deadline_at_s: float | None = None  # a prewarm hint's expected next call (cache clock)
    protect_until_s: float | None = None  # end of that hint's window (deadline + lead, for a late call)
    last_used: int = 0  # logical clock, for tie-breaking
    size_bytes: int | None = None
    # The adapters (registry ids) that ask for this key to stay warm: public content is one key under
    # every name that holds it, and one name turning keep-warm off must not unpin it for the others.
    keep_warm_by: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Residency:
    """Which adapters are where, as of the cache's last change; safe to read from any thread."""

    device_keys: tuple[str, ...] = ()  # READY in a slot, most recently used first
    host_keys: tuple[str, ...] = ()  # with a host copy


@dataclass
class _Entry:
    key: str
    slot: int | None = None
    state: AdapterState | None = None  # device state; None: not in a slot
    refcount: int = 0
    host_bytes: int | None = None  # None: no host copy
    host_buffer: Any = None  # the host copy itself (the loader's packed buffer), when host_bytes is set
    retiring: bool = False  # invalidated: serves its holders, takes no new reference, then goes
    # Brought into that tier by a prefetch, and no request has taken a reference on it since.
    unused_prefetch_host: bool = False
    unused_prefetch_device: bool = False
    host_since: int = 0  # when its host copy was stored (the cache's tick): keep-warm pins go oldest first


class AdapterCache:
    def __init__(
        self,
        num_slots: int,
        host_budget_bytes: int = 0,
        *,
        clock: Callable[[], float] = time.monotonic,
        rate_time_constant_s: float = 60.0,
        long_rate_time_constant_s: float = 86_400.0,
        tier_costs: dict[str, TierCost] | None = None,
        min_prewarm_grace_s: float = 1.0,
        max_idle_usage_records: int = MAX_IDLE_USAGE_RECORDS,
    ) -> None:
        if num_slots < 1:
            raise ValueError("num_slots must be positive")
        if host_budget_bytes < 0:
            raise ValueError("host_budget_bytes must be >= 0")
        if rate_time_constant_s <= 0:
            raise ValueError("rate_time_constant_s must be positive")
        if long_rate_time_constant_s <= 0:
            raise ValueError("long_rate_time_constant_s must be positive")
        if max_idle_usage_records < 1:
            raise ValueError("max_idle_usage_records must be positive")
        self.num_slots = num_slots
        self.host_budget_bytes = host_budget_bytes
        self.max_idle_usage_records = max_idle_usage_records
        self._clock = clock
        self._tau_s = rate_time_constant_s
        self._long_tau_s = long_rate_time_constant_s
        self._min_grace_s = min_prewarm_grace_s
        self._costs = {
            tier: TierCost(c.bytes_per_ms, c.fixed_ms)
            for tier, c in (tier_costs or DEFAULT_TIER_COSTS).items()
        }
        # tier -> (average ms from a request's arrival to its first step, requests seen): see `record_wait`.
        self._waits: dict[str, tuple[float, int]] = {}
        self._entries: dict[str, _Entry] = {}
        self._usage: dict[str, _Usage] = {}
        self._usage_trim_floor = 0  # no trim below this many records (`_trim_idle_usage`)
        self._free_slots: list[int] = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._host_used_bytes = 0
        self._tick_count = 0
        # Prefetched copies that left their tier ("host" or "device") before any request used them.
        self.wasted_prefetches: Counter[str] = Counter()
        # Replaced, never mutated, by the engine thread after each change: other threads read it as is.
        self.residency = Residency()

    # -- queries -----------------------------------------------------------------------------------------

    def state(self, key: str) -> AdapterState | None:
        entry = self._entries.get(key)
        return entry.state if entry else None

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def reserved_slot(self, key: str) -> int | None:
        """The slot of `key`, loading or ready; None when it has none."""
        entry = self._entries.get(key)
        return entry.slot if entry else None

    def slot_of(self, key: str) -> int | None:
        """The slot of a READY adapter (retiring ones too: their holders still run on it), else None."""
        entry = self._entries.get(key)
        return entry.slot if entry and entry.state is AdapterState.READY else None

    def is_usable(self, key: str) -> bool:
        """True when a new sequence may run on `key` now: READY in a slot and not retiring."""
        entry = self._entries.get(key)
        return entry is not None and entry.state is AdapterState.READY and not entry.retiring

    def is_retiring(self, key: str) -> bool:
        """True while an invalidated entry of `key` still holds a slot (see the module docstring)."""
        entry = self._entries.get(key)
        return entry is not None and entry.retiring

    def refcount(self, key: str) -> int:
        entry = self._entries.get(key)
        return entry.refcount if entry else 0

    def tier_of(self, key: str) -> str:
        """Where a request for `key` would find it now: "device", "host" or "disk" (anything below)."""
        entry = self._entries.get(key)
        if entry is None or entry.retiring:
            return DISK
        if entry.state is AdapterState.READY:
            return DEVICE
        return HOST if entry.host_bytes is not None else DISK

    def on_host(self, key: str) -> bool:
        entry = self._entries.get(key)
        return entry is not None and entry.host_bytes is not None

    def resident_keys(self) -> list[str]:
        """Keys of READY adapters a new request may use, most recently used first (engine thread only;
        other threads read `residency`)."""
        ready = [e.key for e in self._entries.values() if e.state is AdapterState.READY and not e.retiring]
        return sorted(ready, key=lambda k: -self._usage[k].last_used)

    def known_keys(self) -> list[str]:
        """Every key the cache holds anything of: an entry in any tier or state, or a usage record."""
        return sorted(set(self._entries) | set(self._usage))

    def host_keys(self) -> list[str]:
        """Keys with a host copy (engine thread only; other threads read `residency`)."""
        return [e.key for e in self._entries.values() if e.host_bytes is not None]

    def host_buffer(self, key: str) -> Any:
        """The host copy of `key` (as stored by `store_host`), or None."""
        entry = self._entries.get(key)
        return entry.host_buffer if entry is not None and entry.host_bytes is not None else None

    def _publish(self) -> None:
        """Replaces the `residency` snapshot; called at the end of every change to the tiers."""
        self.residency = Residency(tuple(self.resident_keys()), tuple(self.host_keys()))

    @property
    def host_used_bytes(self) -> int:
        return self._host_used_bytes

    def is_protected(self, key: str) -> bool:
        """True while a prewarm hint's window for `key` is open and its predicted call has not come."""
        usage = self._usage.get(key)
        return (
            usage is not None and usage.protect_until_s is not None and self._clock() <= usage.protect_until_s
        )

    def predicted_reuse_per_s(self, key: str) -> float:
        """Expected requests per second for `key` now: the decayed EWMA rate, plus 1/(time to go) while a
        prewarm hint's window is open (until the call comes, or the window ends for a late call)."""
        return self._reuse_per_s(key, long=False)

    def _reuse_per_s(self, key: str, long: bool) -> float:
        usage = self._usage.get(key)
        if usage is None:
            return 0.0
        now = self._clock()
        rate, tau = (usage.long_rate_per_s, self._long_tau_s) if long else (usage.rate_per_s, self._tau_s)
        reuse = rate * math.exp(-max(0.0, now - usage.rate_at_s) / tau)
        if self.is_protected(key) and usage.deadline_at_s is not None:
            reuse += 1.0 / max(usage.deadline_at_s - now, 1.0)
        return reuse

    def host_value_per_byte(self, key: str, size_bytes: int | None = None) -> float:
        """Expected reuse value per byte of a host copy of `key`: long-horizon predicted reuse (requests/s,
        the prewarm term included) x its reload cost from disk (ms) / its size (bytes)."""
        size = size_bytes if size_bytes is not None else self._size_of(key)
        reload_ms = self._costs[DISK].load_ms(size)
        return self._reuse_per_s(key, long=True) * reload_ms / max(size, 1)

    def reload_cost_ms(self, key: str, tier: str) -> float:
        """Estimated ms to bring `key` back into `tier` after it left it. Into a slot: what the load from
        the tier it would come from costs (a copy from its host copy, else a read from disk), or what
        requests served from that tier have waited longer than those whose adapter was in a slot, when
        that is more (`record_wait`)."""
        entry = self._entries.get(key)
        size = self._size_of(key)
        if tier != DEVICE:
            return self._costs[DISK].load_ms(size)
        source = HOST if entry is not None and entry.host_bytes is not None else DISK
        return max(self._costs[source].load_ms(size), self.wait_penalty_ms(source))

    def record_wait(self, tier: str, wait_ms: float) -> None:
        """A request reached its first step `wait_ms` after its arrival, its adapter served from `tier`
        ("device", "host" or "disk"): a moving average per tier."""
        average, count = self._waits.get(tier, (0.0, 0))
        weight = max(_WAIT_WEIGHT, 1.0 / (count + 1))  # the plain mean until the average takes over
        self._waits[tier] = ((1 - weight) * average + weight * wait_ms, count + 1)

    def waits(self) -> dict[str, tuple[float, int]]:
        """Per tier: the average ms from a request's arrival to its first step and the requests counted."""
        return dict(self._waits)

    def wait_penalty_ms(self, tier: str) -> float:
        """How much longer requests served from `tier` wait for their first step than those whose adapter
        was in a slot: what an adapter leaving its slot costs its next call, as requests see it (a copy
        from host memory begins on arrival and mostly ends within the step running then; a read from
        disk more often misses it). 0 until both tiers have MIN_WAIT_SAMPLES."""
        mine, device = self._waits.get(tier), self._waits.get(DEVICE)
        if mine is None or device is None or min(mine[1], device[1]) < MIN_WAIT_SAMPLES:
            return 0.0
        return max(0.0, mine[0] - device[0])

    def known_size(self, key: str) -> int | None:
        """The host-buffer size of `key` measured by an earlier load (it outlives residency), or None."""
        usage = self._usage.get(key)
        return usage.size_bytes if usage is not None else None

    def _size_of(self, key: str) -> int:
        usage = self._usage.get(key)
        if usage is not None and usage.size_bytes is not None:
            return usage.size_bytes
        known = [u.size_bytes for u in self._usage.values() if u.size_bytes is not None]
        return sum(known) // len(known) if known else 1

    def _expected_cost(self, key: str, tier: str) -> float:
        return self.predicted_reuse_per_s(key) * self.reload_cost_ms(key, tier)

    def _eviction_order(self, key: str, tier: str) -> tuple[bool, float, int]:
        """Sort key of victims, first goes first: unprotected before protected, then by expected cost,
        then least recently used."""
        return self.is_protected(key), self._expected_cost(key, tier), self._usage[key].last_used

    # -- demand ------------------------------------------------------------------------------------------

    def _tick(self) -> int:
        self._tick_count += 1
        return self._tick_count

    def _usage_of(self, key: str) -> _Usage:
        usage = self._usage.get(key)
        if usage is None:
            usage = self._usage[key] = _Usage(rate_at_s=self._clock())
            # Every entry has a record: past this, more than the bound of records belong to no entry.
            trim_past = max(len(self._entries) + self.max_idle_usage_records, self._usage_trim_floor)
            if len(self._usage) > trim_past:
                self._trim_idle_usage(keep=key)
        return usage

    def _trim_idle_usage(self, keep: str) -> None:
        """Drops the records of keys in no tier, least valuable first, down to three quarters of the
        bound (amortized: a trim scans the records once per quarter of the bound added). Records of keys
        kept warm or protected by a prewarm hint stay, and so does `keep`'s (being made now). The next trim
        waits for a quarter of the bound more records, however many of these stayed: past a quarter of
        the bound of them, every new key would scan and sort them all again."""
        idle = [
            k
            for k, u in self._usage.items()
            if k not in self._entries and k != keep and not u.keep_warm_by and not self.is_protected(k)
        ]
        excess = len(idle) - self.max_idle_usage_records * 3 // 4
        if excess > 0:
            idle.sort(key=lambda k: (self._reuse_per_s(k, long=True), self._usage[k].last_used))
            for k in idle[:excess]:
                del self._usage[k]
        self._usage_trim_floor = len(self._usage) + max(1, self.max_idle_usage_records // 4)

    def _entry(self, key: str) -> _Entry:
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(key)
            self._usage_of(key)
        return entry

    def record_use(self, key: str) -> None:
        """One request for `key`: moves its EWMA rates (rate <- rate * e^(-dt/tau) + 1/tau, for each tau)."""
        usage = self._usage_of(key)
        now = self._clock()
        elapsed_s = max(0.0, now - usage.rate_at_s)
        usage.rate_per_s = usage.rate_per_s * math.exp(-elapsed_s / self._tau_s) + 1.0 / self._tau_s
        usage.long_rate_per_s = (
            usage.long_rate_per_s * math.exp(-elapsed_s / self._long_tau_s) + 1.0 / self._long_tau_s
        )
        usage.rate_at_s = now
        usage.last_used = self._tick()
        if usage.protect_until_s is not None:
            # The predicted call came (early or late): the hint is spent.
            usage.deadline_at_s = usage.protect_until_s = None

    def hint(self, key: str, deadline_at_s: float | None) -> None:
        """A prewarm hint: `key` is expected around `deadline_at_s` (cache clock); None clears it. It is
        protected until its next use, or until the deadline plus as long again as the lead."""
        usage = self._usage_of(key)
        usage.deadline_at_s = deadline_at_s
        if deadline_at_s is None:
            usage.protect_until_s = None
            return
        lead_s = max(deadline_at_s - self._clock(), 0.0)
        usage.protect_until_s = deadline_at_s + max(lead_s, self._min_grace_s)

    def set_keep_warm(self, key: str, holder: str, keep_warm: bool) -> None:
        """Adapter `holder` (its registry id) asks for `key` to stay warm, or no longer does. A key some
        adapter asks for never leaves host memory once there (within KEEP_WARM_SHARE)."""
        if keep_warm:
            self._usage_of(key).keep_warm_by.add(holder)
        elif (usage := self._usage.get(key)) is not None:  # a key invalidated meanwhile is not made again
            usage.keep_warm_by.discard(holder)

    def is_keep_warm(self, key: str) -> bool:
        usage = self._usage.get(key)
        return usage is not None and bool(usage.keep_warm_by)

    def record_size(self, key: str, size_bytes: int) -> None:
        self._usage_of(key).size_bytes = size_bytes

    def record_load(self, tier: str, size_bytes: int, elapsed_ms: float) -> None:
        """A measured load from `tier` ("host" or "disk"): updates that tier's throughput estimate."""
        cost = self._costs[tier]
        variable_ms = elapsed_ms - cost.fixed_ms
        if size_bytes <= 0 or variable_ms <= 0:
            return
        measured = size_bytes / variable_ms
        cost.bytes_per_ms = (1 - _MEASURE_WEIGHT) * cost.bytes_per_ms + _MEASURE_WEIGHT * measured

    # -- device slots ------------------------------------------------------------------------------------

    def _device_victim(self) -> _Entry | None:
        candidates = [e for e in self._entries.values() if e.state is AdapterState.READY and e.refcount == 0]
        if not candidates:
            return None
        return min(candidates, key=lambda e: self._eviction_order(e.key, DEVICE))

    def num_admittable(self, keep: set[str]) -> int:
        """Slots `admit` can hand out now, one after another, without evicting any key of `keep`: the free
        ones and those of unreferenced READY entries."""
        unused = sum(
            1
            for e in self._entries.values()
            if e.state is AdapterState.READY and e.refcount == 0 and e.key not in keep
        )
        return len(self._free_slots) + unused

    def can_admit(self, key: str) -> bool:
        """True when `key` has a slot or one can be had (free, or by evicting an unused one); False while
        a retiring entry of `key` still holds its slot."""
        entry = self._entries.get(key)
        if entry is not None and entry.retiring:
            return False
        if entry is not None and entry.state is not None:
            return True
        return bool(self._free_slots) or self._device_victim() is not None

    def admit(self, key: str) -> tuple[int, str | None]:
        """Reserves a slot for `key` in LOADING state; returns (slot, key evicted from its slot or None).

        The evicted adapter keeps its host copy, if any (it moves down one tier)."""
        entry = self._entries.get(key)
        if entry is not None and (entry.state is not None or entry.retiring):
            raise ValueError(f"adapter {key!r} is already admitted or still retiring")
        evicted = None
        if self._free_slots:
            slot = self._free_slots.pop()
        else:
            victim = self._device_victim()
            if victim is None:
                raise RuntimeError("admit without can_admit: every slot is referenced or loading")
            slot, evicted = victim.slot, victim.key
            self._leave_slot(victim)
        entry = self._entry(key)
        entry.slot, entry.state = slot, AdapterState.LOADING
        self._usage[key].last_used = self._tick()
        if evicted is not None:
            self._publish()
        return slot, evicted

    def _leave_slot(self, entry: _Entry) -> None:
        """Takes `entry` out of its slot (the slot itself is the caller's to reuse or free)."""
        self._count_unused_device(entry)
        entry.slot, entry.state = None, None
        if entry.host_bytes is None and not entry.refcount:
            log.debug(
                "adapter left its slot without a host copy key=%s protected=%s",
                entry.key[:12],
                self.is_protected(entry.key),
            )
            del self._entries[entry.key]

    def mark_ready(self, key: str) -> int | None:
        """The load into the slot of `key` is done: READY, returns the slot. A retiring entry (invalidated
        while it loaded; nothing holds it) leaves its slot instead, and None is returned."""
        entry = self._entries.get(key)
        if entry is None or entry.state is not AdapterState.LOADING or entry.slot is None:
            raise ValueError(f"adapter {key!r} is not loading")
        if entry.retiring and not entry.refcount:
            self.fail(key)
            return None
        entry.state = AdapterState.READY
        self._usage[key].last_used = self._tick()
        self._publish()
        return entry.slot

    def fail(self, key: str) -> None:
        """Drops an entry from every tier and frees its slot (references go with it): its load failed, or
        a retiring entry's last use ended."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        if entry.slot is not None:
            self._count_unused_device(entry)
            self._free_slots.append(entry.slot)
        if entry.host_bytes is not None:
            self._count_unused_host(entry)
            self._host_used_bytes -= entry.host_bytes
        if entry.retiring:
            self._usage.pop(key, None)
        self._publish()

    def acquire(self, key: str) -> None:
        """A request is promised `key` (it may still be loading); counts as one use."""
        entry = self._entries[key]
        if entry.retiring:
            raise ValueError(f"adapter {key!r} is retiring: it takes no new reference")
        entry.refcount += 1
        entry.unused_prefetch_host = entry.unused_prefetch_device = False  # a request uses it
        self.record_use(key)

    def release(self, key: str) -> None:
        entry = self._entries.get(key)
        if entry is None:  # dropped by `fail`
            return
        if entry.refcount <= 0:
            raise RuntimeError(f"release of adapter {key!r} without a reference")
        entry.refcount -= 1
        self._usage[key].last_used = self._tick()
        if entry.retiring and not entry.refcount and entry.state is not AdapterState.LOADING:
            self.fail(key)  # its last holder is done: the slot is free

    def prefetch(self, key: str, deadline_at_s: float | None = None) -> int | None:
        """Starts bringing `key` into a slot without a reference; returns the slot to load, or None when it
        already has one or no slot can be had. A deadline also counts as a prewarm hint."""
        if deadline_at_s is not None:
            self.hint(key, deadline_at_s)
        entry = self._entries.get(key)
        if (entry is not None and entry.state is not None) or not self.can_admit(key):
            return None
        slot, _ = self.admit(key)
        self._entries[key].unused_prefetch_device = True
        return slot

    def evict(self, key: str) -> bool:
        """Frees the slot of an unreferenced READY adapter (a host copy stays); False when it is absent,
        loading or in use."""
        entry = self._entries.get(key)
        if entry is None or entry.state is not AdapterState.READY or entry.refcount:
            return False
        slot = entry.slot
        self._leave_slot(entry)
        self._free_slots.append(slot)
        self._publish()
        return True

    def demote(self, key: str) -> bool:
        """A demote hint: forget any prewarm deadline and free its slot if unused (a host copy stays).
        Ignored while a prewarm hint protects `key` (it was predicted for a call still to come)."""
        if self.is_protected(key):
            return False
        self.hint(key, None)
        return self.evict(key)

    def invalidate(self, key: str) -> bool:
        """Drops `key` from every tier now: its host copy at once, an unused slot at once. A slot still
        referenced or being written retires (see the module docstring): the entry leaves when its last
        holder releases it (`release`) or its load ends (`mark_ready` or `fail`). Returns whether it is
        gone already. References of sequences that merely wait for `key` are the caller's to release
        first, so that those sequences load it afresh."""
        entry = self._entries.get(key)
        if entry is None:
            self._usage.pop(key, None)
            return True
        self._drop_host(entry)
        if entry.refcount or entry.state is AdapterState.LOADING:
            entry.retiring = True
            self._publish()
            return False
        self.fail(key)  # frees an unused slot (a no-op when the host copy was all there was)
        self._usage.pop(key, None)
        self._publish()
        return True

    # -- host memory -------------------------------------------------------------------------------------

    def _host_victims(self, key: str, size_bytes: int) -> list[_Entry]:
        """Host entries that may give up their buffer for `key` (of `size_bytes`), first to go first, by
        value per byte (`host_value_per_byte`): for an unprotected `key`, unprotected entries worth no more
        per byte than it; for a protected one, every unprotected entry, then protected ones expected to be
        needed later than `key` (a protected entry never makes room for an unprotected one)."""
        protected = self.is_protected(key)
        incoming_cost = self._expected_cost(key, HOST) if protected else None
        incoming_value = self.host_value_per_byte(key, size_bytes)
        pinned = self._pinned_keep_warm()
        candidates = [
            e
            for e in self._entries.values()
            if e.host_bytes is not None
            and e.key != key
            and e.state is not AdapterState.LOADING  # its buffer is being copied into a slot
            and e.key not in pinned
            and (
                (protected or self.host_value_per_byte(e.key) <= incoming_value)
                if not self.is_protected(e.key)
                else incoming_cost is not None and self._expected_cost(e.key, HOST) < incoming_cost
            )
        ]
        return sorted(
            candidates,
            key=lambda e: (
                self.is_protected(e.key),
                self.host_value_per_byte(e.key),
                self._usage[e.key].last_used,
            ),
        )

    def _pinned_keep_warm(self) -> set[str]:
        """The keep-warm host copies that never leave: oldest stored first, while those before hold less
        than KEEP_WARM_SHARE of the host budget. Any tenant may mark its adapters keep-warm, so past that share they are ranked by
        value like the rest: a tenant marking hundreds could otherwise take the whole tier from everyone."""
        warm = sorted(
            (
                e
                for e in self._entries.values()
                if e.host_bytes is not None and self._usage[e.key].keep_warm_by
            ),
            key=lambda e: e.host_since,
        )
        pinned, used = set(), 0
        for entry in warm:
            if used >= KEEP_WARM_SHARE * self.host_budget_bytes:
                break
            pinned.add(entry.key)
            used += entry.host_bytes
        return pinned

    def can_host(self, key: str, size_bytes: int) -> bool:
        if self.on_host(key):
            return True
        if self.is_retiring(key):
            return False
        free = self.host_budget_bytes - self._host_used_bytes
        if size_bytes <= free:
            return True
        return size_bytes <= free + sum(e.host_bytes or 0 for e in self._host_victims(key, size_bytes))

    def store_host(
        self, key: str, size_bytes: int, buffer: Any = None, prefetched: bool = False
    ) -> list[str] | None:
        """Keeps `buffer`, the host copy of `key` of `size_bytes`, evicting cheaper host copies (and with
        them their buffers) to make room. `prefetched`: a prefetch read it (no request asked for it).

        Returns the keys whose host copies were evicted, or None when it does not fit (or `key` is
        retiring): then no host copy is kept (a prefetched one counts as wasted)."""
        self.record_size(key, size_bytes)
        if self.on_host(key):
            return []
        if not self.can_host(key, size_bytes):
            if prefetched:
                self.wasted_prefetches[HOST] += 1
            return None
        evicted = []
        for victim in self._host_victims(key, size_bytes):
            if self.host_budget_bytes - self._host_used_bytes >= size_bytes:
                break
            self._drop_host(victim)
            evicted.append(victim.key)
        entry = self._entry(key)
        entry.host_bytes, entry.host_buffer = size_bytes, buffer
        entry.host_since = self._tick()
        entry.unused_prefetch_host = prefetched and not entry.refcount
        self._host_used_bytes += size_bytes
        self._publish()
        return evicted

    def drop_host(self, key: str) -> bool:
        """Forgets the host copy of `key` (not while it is being copied into a slot)."""
        entry = self._entries.get(key)
        if entry is None or entry.host_bytes is None or entry.state is AdapterState.LOADING:
            return False
        self._drop_host(entry)
        self._publish()
        return True

    def _drop_host(self, entry: _Entry) -> None:
        """Forgets the host copy of `entry` (its bytes go with the last reference to the buffer: a load
        copying from it keeps its own), and the entry itself when nothing else is left of it."""
        if entry.host_bytes is None:
            return
        self._count_unused_host(entry)
        self._host_used_bytes -= entry.host_bytes
        entry.host_bytes, entry.host_buffer = None, None
        if entry.state is None and not entry.refcount:
            del self._entries[entry.key]

    # -- prefetch accounting -----------------------------------------------------------------------------

    def _count_unused_host(self, entry: _Entry) -> None:
        """`entry` loses its host copy: a prefetched one no request used was a wasted prefetch."""
        if entry.unused_prefetch_host:
            self.wasted_prefetches[HOST] += 1
            entry.unused_prefetch_host = False

    def _count_unused_device(self, entry: _Entry) -> None:
        """`entry` leaves its slot: a prefetched one that landed (READY) and no request used was wasted (a
        load that failed or was invalidated in flight never landed, and is not counted)."""
        if entry.unused_prefetch_device and entry.state is AdapterState.READY:
            self.wasted_prefetches[DEVICE] += 1
        entry.unused_prefetch_device = False
