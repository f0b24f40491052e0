"""AdapterLoader: brings adapters in on a background thread, so the batch never waits on a load.

A load reads and validates the adapter directory and packs it into one host buffer (skipped when the
engine already holds a host copy), then, when a slot was reserved, copies the buffer into that slot
(on its own CUDA stream on GPU). The engine thread submits loads and, at the start of each step, collects
finished ones and marks their slots ready; the forward pass in between never touches a loading slot.
The loader thread runs torch ops on one intra-op thread, so a load takes at most one core from decoding.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch

from data_plane.adapters.host_buffer import HostAdapter, pack
from data_plane.adapters.peft_reader import read_peft_adapter
from data_plane.adapters.weights import AdapterWeights, linear_mix
from data_plane.engine.request import AdapterRef
from openlora.base_model import BaseModelSpec

# (slot, host buffer) -> None: copies the buffer into the slot; runs on the loader thread.
SlotInstaller = Callable[[int, HostAdapter], None]

CAUSE_REQUEST = "request"  # a request waits for this adapter
CAUSE_PREFETCH = "prefetch"  # a prewarm hint asked for it; no request yet


def _one_intra_op_thread() -> None:
    # OpenMP's thread count is per calling thread: this caps the loader's ops, not the engine thread's.
    torch.set_num_threads(1)


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

    @property
    def source_tier(self) -> str:
        return "disk" if self.read_from_disk else "host"


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
        # The host tier's bytes, by key (the adapter cache keeps the books); the engine thread owns it.
        self.host_buffers: dict[str, HostAdapter] = {}
        self._pin_memory = pin_memory
        self.read_delay_s = read_delay_s
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="adapter-loader", initializer=_one_intra_op_thread
        )
        self._in_flight: dict[str, tuple[Future, float, str]] = {}

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    def is_loading(self, key: str) -> bool:
        return key in self._in_flight

    def submit(
        self,
        key: str,
        members: tuple[AdapterRef, ...],
        host: HostAdapter | None = None,
        cause: str = CAUSE_REQUEST,
    ) -> None:
        """Loads `key` into the slot reserved for it now (host memory only when none), from `host` or its
        host copy when there is one, else from disk (`members`). `cause` (CAUSE_REQUEST or CAUSE_PREFETCH)
        is reported back with the finished load. Call on the engine thread."""
        if key in self._in_flight:
            raise ValueError(f"adapter {key!r} is already loading")
        slot = self._reserved_slot(key)
        host = host if host is not None else self.host_buffers.get(key)
        started_at = time.monotonic()
        future = self._pool.submit(self._load, key, members, slot, host, started_at, cause)
        self._in_flight[key] = (future, started_at, cause)

    def _load(
        self,
        key: str,
        members: tuple[AdapterRef, ...],
        slot: int | None,
        host: HostAdapter | None,
        started_at: float,
        cause: str,
    ) -> FinishedLoad:
        read_from_disk = host is None
        t0 = time.monotonic()
        if host is None:
            if self.read_delay_s:
                time.sleep(self.read_delay_s)
            host = pack(self._read(members), self._pin_memory)
        t1 = time.monotonic()
        if slot is not None and self._install is not None:
            self._install(slot, host)
        t2 = time.monotonic()
        return FinishedLoad(
            key, host, None, started_at, slot, read_from_disk, (t1 - t0) * 1000, (t2 - t1) * 1000, cause
        )

    def _read(self, members: tuple[AdapterRef, ...]) -> AdapterWeights:
        if len(members) == 1 and members[0].weight == 1.0:
            return read_peft_adapter(members[0].path, self._spec, self._max_rank, self._dtype)
        parts = [
            (read_peft_adapter(m.path, self._spec, self._max_rank, self._dtype), m.weight) for m in members
        ]
        return linear_mix(parts, self._max_rank)

    def wait(self, timeout_s: float) -> None:
        """Blocks until some load finishes or `timeout_s` passes (for an engine with nothing else to do)."""
        if self._in_flight:
            wait([f for f, _, _ in self._in_flight.values()], timeout=timeout_s, return_when=FIRST_COMPLETED)

    def collect(self) -> list[FinishedLoad]:
        finished = []
        for key, (future, started_at, cause) in list(self._in_flight.items()):
            if not future.done():
                continue
            del self._in_flight[key]
            error = future.exception()
            if error is not None:
                finished.append(FinishedLoad(key, None, error, started_at, None, True, cause=cause))
            else:
                finished.append(future.result())
        return finished

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
