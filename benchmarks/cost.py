"""GPU-hours per million tokens for one trace: one shared OpenLoRA worker against one dedicated deployment
per adapter, each deployment sized for its own adapter's peak.

Demand is the tokens each request asks for, binned by arrival time into windows of `window_s`. A
deployment (or worker) delivers `capacity_tokens_per_s`, the throughput measured in the same run; it
needs ceil(peak window demand / capacity) replicas, at least one, for the whole trace duration:

    dedicated = sum over adapters of max(1, ceil(peak_a / capacity_dedicated)) * duration
    shared    = max(1, ceil(peak_all / capacity_shared)) * duration
    cost      = GPU-hours / (total tokens / 1e6)
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks.trace import TraceRequest


@dataclass(frozen=True)
class CostEstimate:
    num_adapters: int
    total_tokens: int
    duration_s: float
    window_s: float
    shared_replicas: int
    dedicated_replicas: int
    shared_gpu_hours_per_million_tokens: float
    dedicated_gpu_hours_per_million_tokens: float

    @property
    def ratio(self) -> float:
        """How many times more a dedicated deployment per adapter costs than the shared worker."""
        return self.dedicated_gpu_hours_per_million_tokens / self.shared_gpu_hours_per_million_tokens


def peak_tokens_per_s(requests: Sequence[TraceRequest], window_s: float) -> float:
    """The largest demand (requested tokens / window_s) over fixed windows of arrival time."""
    bins: dict[int, int] = defaultdict(int)
    for r in requests:
        bins[int(r.arrival_s // window_s)] += r.max_tokens
    return max(bins.values(), default=0) / window_s


def replicas_for(peak: float, capacity_tokens_per_s: float) -> int:
    return max(1, math.ceil(peak / capacity_tokens_per_s - 1e-9))


def estimate_cost(
    requests: Sequence[TraceRequest],
    *,
    shared_capacity_tokens_per_s: float,
    dedicated_capacity_tokens_per_s: float,
    window_s: float = 10.0,
    duration_s: float | None = None,
) -> CostEstimate:
    """Cost of serving `requests` both ways; `duration_s` defaults to the last arrival plus one window."""
    if shared_capacity_tokens_per_s <= 0 or dedicated_capacity_tokens_per_s <= 0:
        raise ValueError("capacities must be > 0 tokens/s")
    if not requests:
        raise ValueError("the trace is empty")
    if duration_s is None:
        duration_s = max(r.arrival_s for r in requests) + window_s
    by_adapter: dict[str, list[TraceRequest]] = defaultdict(list)
    for r in requests:
        by_adapter[r.adapter].append(r)
    dedicated = sum(
        replicas_for(peak_tokens_per_s(rs, window_s), dedicated_capacity_tokens_per_s)
        for rs in by_adapter.values()
    )
    shared = replicas_for(peak_tokens_per_s(requests, window_s), shared_capacity_tokens_per_s)
    total_tokens = sum(r.max_tokens for r in requests)
    millions = total_tokens / 1e6
    hours = duration_s / 3600.0
    return CostEstimate(
        num_adapters=len(by_adapter),
        total_tokens=total_tokens,
        duration_s=duration_s,
        window_s=window_s,
        shared_replicas=shared,
        dedicated_replicas=dedicated,
        shared_gpu_hours_per_million_tokens=shared * hours / millions,
        dedicated_gpu_hours_per_million_tokens=dedicated * hours / millions,
    )
