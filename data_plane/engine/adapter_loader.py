"""AdapterLoader: reads and validates adapter directories on a background thread.

The engine thread submits (key, members) and, at the start of each step, collects finished loads as
ready CPU tensors to copy into their slots; the batch never waits on disk.
"""

from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch

from data_plane.adapters.peft_reader import read_peft_adapter
from data_plane.adapters.weights import AdapterWeights, linear_mix
from data_plane.engine.request import AdapterRef
from openlora.base_model import BaseModelSpec


@dataclass
class FinishedLoad:
    key: str
    weights: AdapterWeights | None
    error: Exception | None
    started_at: float  # time.monotonic()


class AdapterLoader:
    def __init__(self, spec: BaseModelSpec, max_rank: int, dtype: torch.dtype) -> None:
        self._spec = spec
        self._max_rank = max_rank
        self._dtype = dtype
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-loader")
        self._in_flight: dict[str, tuple[Future, float]] = {}

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    def submit(self, key: str, members: tuple[AdapterRef, ...]) -> None:
        self._in_flight[key] = (self._pool.submit(self._read, members), time.monotonic())

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
            wait([f for f, _ in self._in_flight.values()], timeout=timeout_s, return_when=FIRST_COMPLETED)

    def collect(self) -> list[FinishedLoad]:
        finished = []
        for key, (future, started_at) in list(self._in_flight.items()):
            if not future.done():
                continue
            del self._in_flight[key]
            error = future.exception()
            finished.append(FinishedLoad(key, None if error else future.result(), error, started_at))
        return finished

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
