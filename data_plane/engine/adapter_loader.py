"""AdapterLoader: brings adapters in on background threads, so the batch never waits on a load.

A load reads and validates the adapter directory and packs it into one host buffer (skipped when the
engine hands it the host copy the adapter cache holds), then, when a slot was reserved, copies the buffer
into that slot (on its own CUDA stream on GPU). Disk loads and copies from host memory run on two
threads of their own, so a copy from host memory (a fraction of a step) never queues behind a disk read. The engine thread submits loads and, at the start of each
step, collects finished ones and gives their buffers to the adapter cache, the one owner of the host tier;
the loader keeps none. The forward pass in between never touches a loading slot. A load in flight when
its adapter is invalidated comes back `stale`: its result must not be kept.
Each loader thread runs torch ops on one intra-op thread.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch

from data_plane.adapters.host_buffer import HostAdapter, pack
from data_plane.adapters.peft_reader import host_dtype, read_packed_adapter, read_peft_adapter
from data_plane.adapters.weights import linear_mix
from data_plane.engine.intra_op import use_threads
from data_plane.engine.request import AdapterRef
from openlora.adapter_format import AdapterFormatError, read_safetensors_header
from openlora.artifact import WEIGHTS_FILE
from openlora.base_model import BaseModelSpec

# (slot, host buffer) -> None: copies the buffer into the slot; runs on the loader thread.
SlotInstaller = Callable[[int, HostAdapter], None]

CAUSE_REQUEST = "request"  # a request waits for this adapter
CAUSE_PREFETCH = "prefetch"  # a prewarm hint asked for it; no request yet
# Disk reads begun on a request's arrival (`read_ahead`) that no load has claimed yet: at most this many,
# each kept at most this long (a request that never reaches the engine leaves one behind).
MAX_READS_AHEAD = 4
READ_AHEAD_TTL_S = 10.0
# A larger adapter (by its file headers) is not read ahead: its load reads it, as before.
MAX_READ_AHEAD_BYTES = 64 << 20


def _one_intra_op_thread() -> None:
    # The loader's ops on one thread, beside the engine's; the process default is left alone (intra_op).
    use_threads(1)


@dataclass
class FinishedLoad:
    key: str
    host: HostAdapter | None  # the packed adapter (None when the load failed)
    error: Exception | None
    started_at: float  # time.monotonic()
    slot: int | None  # the slot it was copied into; None for a host-only prefetch
    read_from_disk: bool
    read_ms: float = 0.0  # disk -> host buffer
    copy_ms: float = 0.0  # host buffer -> slot
    cause: str = CAUSE_REQUEST
    members: tuple[AdapterRef, ...] = ()  # what it was read from
    stale: bool = False  # `key` was invalidated while it loaded: keep nothing of it

    @property
    def source_tier(self) -> str:
        return "disk" if self.read_from_disk else "host"


def is_plain(members: tuple[AdapterRef, ...]) -> bool:
    """One adapter at weight 1: its host copy keeps the file's dtype where that is exact (a mix is
    computed in the engine's dtype)."""
    return len(members) == 1 and members[0].weight == 1.0


def host_copy_bytes(members: tuple[AdapterRef, ...], dtype: torch.dtype) -> int | None:
    """The size of the host buffer a disk load of `members` makes for an engine computing in `dtype`,
    from the safetensors headers alone (no tensor data is read): every factor's elements in the dtype
    the load gives them. None when a header cannot be read (the load itself would say why)."""
    elements = 0
    file_dtypes: set[str] = set()
    for member in members:
        try:
            header, _ = read_safetensors_header(member.path / WEIGHTS_FILE)
        except (AdapterFormatError, OSError):
            return None
        for name, entry in header.items():
            shape = entry.get("shape") if name != "__metadata__" and isinstance(entry, dict) else None
            if isinstance(shape, list) and all(isinstance(d, int) for d in shape):
                elements += math.prod(shape)
                file_dtypes.add(str(entry.get("dtype")))
    if is_plain(members):
        dtype = host_dtype(file_dtypes.pop() if len(file_dtypes) == 1 else "mixed", dtype)
    return elements * torch.empty((), dtype=dtype).element_size()


class AdapterLoader:
    def __init__(
        self,
        spec: BaseModelSpec,
        max_rank: int,
        dtype: torch.dtype,
        install: SlotInstaller | None = None,
        reserved_slot: Callable[[str], int | None] = lambda key: None,
        pin_memory: bool = False,
        read_delay_s: float = 0.0,
    ) -> None:
        """`install` copies a host buffer into a slot; `reserved_slot(key)` is the slot the cache reserved
        for a key (None: load into host memory only). `read_delay_s` adds that much time to every disk read (a slow-storage hook for tests and
        benchmarks; 0 in production)."""
        self._spec = spec
        self._max_rank = max_rank
        self._dtype = dtype
        self._install = install
        self._reserved_slot = reserved_slot
        self._pin_memory = pin_memory
        self.read_delay_s = read_delay_s
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="adapter-loader", initializer=_one_intra_op_thread
        )
        self._copy_pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="adapter-copy", initializer=_one_intra_op_thread
        )
        # key -> (future, started_at, cause, members); the engine thread alone touches it.
        self._in_flight: dict[str, tuple[Future, float, str, tuple[AdapterRef, ...]]] = {}
        self._copying: set[str] = set()  # keys in flight whose load copies from a host buffer
        self._stale: set[str] = set()  # keys in flight whose result is to be dropped
        # The keys in flight, replaced (never mutated) on each change: `is_loading` reads it from any thread.
        self._in_flight_keys: frozenset[str] = frozenset()
        # key -> (disk read begun on arrival, its start, its members): claimed by the load of `key` (`submit`).
        self._ahead: dict[str, tuple[Future, float, tuple[AdapterRef, ...]]] = {}
        self._ahead_lock = threading.Lock()

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    def is_loading(self, key: str) -> bool:
        """True while a load of `key` is in flight; safe to call from any thread."""
        return key in self._in_flight_keys

    def loading_keys(self) -> frozenset[str]:
        """The keys with a load in flight: a snapshot, safe to read from any thread."""
        return self._in_flight_keys

    def is_copying_from_host(self, key: str) -> bool:
        """True while a load of `key` from its host copy is in flight (engine thread)."""
        return key in self._copying

    def mark_stale(self, key: str) -> None:
        """`key` was invalidated: a load of it in flight comes back with `stale` set, and a read begun
        ahead of it is dropped. Engine thread."""
        if key in self._in_flight:
            self._stale.add(key)
        with self._ahead_lock:
            _drop(self._ahead.pop(key, None))

    def keys_read_ahead(self) -> dict[str, frozenset[str]]:
        """The keys read ahead and unclaimed, with the keys of their members (a mix's: its adapters')."""
        with self._ahead_lock:
            return {key: frozenset(m.key for m in entry[2]) for key, entry in self._ahead.items()}

    def read_ahead(self, key: str, members: tuple[AdapterRef, ...]) -> bool:
        """Begins the disk read of `key` now, from any thread (a request's arrival, while a step runs),
        so that its load, submitted once the engine thread takes the request in, finds the host buffer
        read or under way instead of starting the read a step later. Does nothing (False) when `key` is
        loading or read ahead already, or when MAX_READS_AHEAD reads wait unclaimed."""
        now = time.monotonic()
        with self._ahead_lock:
            for old, entry in list(self._ahead.items()):
                if now - entry[1] > READ_AHEAD_TTL_S:
                    _drop(self._ahead.pop(old))
            if key in self._ahead or key in self._in_flight_keys or len(self._ahead) >= MAX_READS_AHEAD:
                return False
            members = tuple(members)
            self._ahead[key] = (self._pool.submit(self._read_ahead, members), now, members)
        return True

    def _read_ahead(self, members: tuple[AdapterRef, ...]) -> HostAdapter | None:
        size = self.estimate_host_bytes(members)
        if size is None or size > MAX_READ_AHEAD_BYTES:
            return None  # its load reads it (and reports what is wrong with its headers)
        return self._read_packed(members)

    def _claim_read_ahead(self, key: str, copy: bool) -> tuple[Future, float, tuple[AdapterRef, ...]] | None:
        """The read ahead of `key` for its load (None when there is none, or the load copies a host buffer:
        then the read is dropped). Marks `key` in flight under the lock `read_ahead` checks it under, so no
        read of it begins between here and the load's own entry."""
        with self._ahead_lock:
            self._in_flight_keys = self._in_flight_keys | {key}
            entry = self._ahead.pop(key, None)
        if copy:
            _drop(entry)
            return None
        return entry

    def submit(
        self,
        key: str,
        members: tuple[AdapterRef, ...],
        host: HostAdapter | None = None,
        cause: str = CAUSE_REQUEST,
        started_at: float | None = None,
        host_only: bool = False,
    ) -> None:
        """Loads `key` into the slot reserved for it now (host memory only when none), from `host` (its
        host copy) when given, else from disk (`members`). `cause` (CAUSE_REQUEST or CAUSE_PREFETCH) is
        reported back with the finished load, and so is `started_at` (time.monotonic(); default now: an
        earlier time when this load continues another, as a copy into a slot of what a disk read brought
        into host memory). `host_only`: a host copy alone, even when `key` has a slot (one READY there
        already). Call on the engine thread."""
        if key in self._in_flight:
            raise ValueError(f"adapter {key!r} is already loading")
        slot = None if host_only else self._reserved_slot(key)
        started_at = time.monotonic() if started_at is None else started_at
        members = tuple(members)
        # A disk read begun on arrival: done, its load is a copy (on the copy thread, waited for by the
        # step's admission as a copy from host memory is); under way, the load starts as it ends (a copy,
        # or a read again on the disk thread when it failed), never queued on the disk thread behind the
        # reads ahead of other requests that began after it.
        ahead = self._claim_read_ahead(key, copy=host is not None)
        if ahead is not None:
            started_at = min(started_at, ahead[1])
        copying = host is not None or (ahead is not None and _read(ahead[0]) is not None)
        args = (key, members, slot, host, started_at, cause, None if ahead is None else ahead[0])
        if ahead is not None and not ahead[0].done():
            future = self._load_once_read(ahead[0], args)
        else:
            future = (self._copy_pool if copying else self._pool).submit(self._load, *args)
        self._in_flight[key] = (future, started_at, cause, members)
        if copying:
            self._copying.add(key)
        self._in_flight_keys = frozenset(self._in_flight)

    def _load_once_read(self, ahead: Future, args: tuple) -> Future:
        """The load (`_load(*args)`) of a key whose read ahead `ahead` is under way, started as it ends."""
        load: Future = Future()

        def start(read: Future) -> None:
            pool = self._copy_pool if _read(read) is not None else self._pool
            try:
                inner = pool.submit(self._load, *args)
            except RuntimeError as error:  # shut down
                load.set_exception(error)
                return
            inner.add_done_callback(functools.partial(_settle, load))

        ahead.add_done_callback(start)
        return load

    def _load(
        self,
        key: str,
        members: tuple[AdapterRef, ...],
        slot: int | None,
        host: HostAdapter | None,
        started_at: float,
        cause: str,
        ahead: Future | None = None,
    ) -> FinishedLoad:
        read_from_disk = host is None
        t0 = time.monotonic()
        if host is None:
            # A read ahead that failed is read again here, so that the load reports its own error.
            host = _read(ahead, wait=True) if ahead is not None else None
            if host is None:
                host = self._read_packed(members)
        t1 = time.monotonic()
        if slot is not None and self._install is not None:
            self._install(slot, host)
        t2 = time.monotonic()
        return FinishedLoad(
            key,
            host,
            None,
            started_at,
            slot,
            read_from_disk,
            (t1 - t0) * 1000,
            (t2 - t1) * 1000,
            cause,
            members,
        )

    def _read_packed(self, members: tuple[AdapterRef, ...]) -> HostAdapter:
        if self.read_delay_s:
            time.sleep(self.read_delay_s)
        return self._read(members)

    def estimate_host_bytes(self, members: tuple[AdapterRef, ...]) -> int | None:
        """`host_copy_bytes` for this engine's dtype."""
        return host_copy_bytes(members, self._dtype)

    def _read(self, members: tuple[AdapterRef, ...]) -> HostAdapter:
        """The host copy of `members`: one adapter's file read into its buffer (`read_packed_adapter`), a
        mix computed from its members' factors and packed."""
        if is_plain(members):
            return read_packed_adapter(
                members[0].path, self._spec, self._max_rank, self._dtype, self._pin_memory
            )
        parts = [
            (read_peft_adapter(m.path, self._spec, self._max_rank, self._dtype), m.weight) for m in members
        ]
        return pack(linear_mix(parts, self._max_rank), self._pin_memory)

    def wait(self, timeout_s: float) -> None:
        """Blocks until some load finishes or `timeout_s` passes (for an engine with nothing else to do)."""
        if self._in_flight:
            futures = [entry[0] for entry in self._in_flight.values()]
            wait(futures, timeout=timeout_s, return_when=FIRST_COMPLETED)

    def wait_for(self, keys: set[str], timeout_s: float) -> None:
        """Blocks until every load of `keys` in flight has finished, or `timeout_s` passes."""
        futures = [self._in_flight[key][0] for key in keys if key in self._in_flight]
        if futures:
            wait(futures, timeout=timeout_s)

    def collect(self) -> list[FinishedLoad]:
        """The loads that ended since the last call (engine thread)."""
        finished = []
        for key, (future, started_at, cause, members) in list(self._in_flight.items()):
            if not future.done():
                continue
            del self._in_flight[key]
            self._copying.discard(key)
            error = future.exception()
            if error is not None:
                load = FinishedLoad(key, None, error, started_at, None, True, cause=cause, members=members)
            else:
                load = future.result()
            load.stale = key in self._stale
            self._stale.discard(key)
            finished.append(load)
        if finished:
            self._in_flight_keys = frozenset(self._in_flight)
        return finished

    @property
    def num_read_ahead(self) -> int:
        """Reads begun on arrival that no load has claimed yet."""
        with self._ahead_lock:
            return len(self._ahead)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._copy_pool.shutdown(wait=False, cancel_futures=True)


def _settle(outer: Future, inner: Future) -> None:
    """`outer` ends as `inner` did."""
    if inner.cancelled():
        outer.cancel()
    elif inner.exception() is not None:
        outer.set_exception(inner.exception())
    else:
        outer.set_result(inner.result())


def _drop(entry: tuple | None) -> None:
    """Forgets a read ahead no load will claim: one not begun yet never takes the disk thread."""
    if entry is not None:
        entry[0].cancel()


def _read(ahead: Future, wait: bool = False) -> HostAdapter | None:
    """The host buffer a read ahead made; None while it runs (`wait`: once it ended), when it failed or
    was cancelled, or when it left the adapter to its load."""
    if ahead.cancelled() or (not wait and not ahead.done()) or ahead.exception() is not None:
        return None
    return ahead.result()
