"""Per-adapter demand from request times: EWMA rate, gap distribution, and the hint it calls for.

Plain Python over Unix seconds, so the clock can be compressed in tests and benchmarks:
- periodic (at least `min_gaps` gaps, coefficient of variation below `periodic_max_cv`): the next call is
  expected one median gap after the last; prewarm from `lead_s` before it until half a gap after.
- bursty (the last call is recent compared with the typical gap inside the burst): prewarm while calls
  keep coming, with the deadline one typical gap ahead.
- otherwise, an adapter whose EWMA rate fell below `demote_below_per_s` gets a demote.
"""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class PredictorConfig:
    rate_time_constant_s: float = 600.0
    lead_s: float = 5.0  # prewarm this long before a predicted call
    min_gaps: int = 3
    periodic_max_cv: float = 0.25
    burst_gap_factor: float = 4.0  # still in the burst while the last call is within this many gaps
    demote_below_per_s: float = 1e-3
    history_s: float = 7 * 24 * 3600.0

    def __post_init__(self) -> None:
        if self.rate_time_constant_s <= 0 or self.lead_s < 0 or self.min_gaps < 2:
            raise ValueError("rate_time_constant_s must be > 0, lead_s >= 0, min_gaps >= 2")


@dataclass(frozen=True)
class Demand:
    rate_per_s: float  # EWMA as of `now`
    median_gap_s: float | None
    gap_cv: float | None  # coefficient of variation of the gaps
    last_at: float


@dataclass(frozen=True)
class Prediction:
    kind: str  # "prewarm" | "demote"
    deadline_at: float | None  # Unix seconds of the expected call (prewarm)
    reason: str  # "periodic" | "burst" | "cold"


def demand_of(times: list[float], now: float, config: PredictorConfig) -> Demand:
    """`times`: Unix seconds of an adapter's requests (any order, at least one)."""
    times = sorted(times)
    rate = 0.0
    previous = times[0]
    for t in times:
        rate = (
            rate * math.exp(-(t - previous) / config.rate_time_constant_s) + 1.0 / config.rate_time_constant_s
        )
        previous = t
    rate *= math.exp(-max(0.0, now - previous) / config.rate_time_constant_s)
    gaps = [b - a for a, b in itertools.pairwise(times) if b > a]
    median = statistics.median(gaps) if gaps else None
    cv = statistics.pstdev(gaps) / statistics.fmean(gaps) if len(gaps) >= 2 else None
    return Demand(rate, median, cv, times[-1])


def predict(times: list[float], now: float, config: PredictorConfig) -> Prediction | None:
    """The hint an adapter's history calls for at `now`, or None."""
    demand = demand_of(times, now, config)
    gaps = len(times) - 1
    periodic = demand.gap_cv is not None and demand.gap_cv <= config.periodic_max_cv
    if periodic and demand.median_gap_s is not None and gaps >= config.min_gaps:
        next_at = demand.last_at + demand.median_gap_s
        while next_at + demand.median_gap_s / 2 < now:  # calls were missed: the next one on the grid
            next_at += demand.median_gap_s
        if next_at - config.lead_s <= now:
            return Prediction("prewarm", next_at, "periodic")
        return None  # between calls: nothing to do yet
    recent = [t for t in sorted(times) if now - t <= config.rate_time_constant_s]
    if len(recent) >= 3:
        burst_gap = statistics.median(b - a for a, b in itertools.pairwise(recent))
        if now - demand.last_at <= config.burst_gap_factor * max(burst_gap, 1e-3):
            return Prediction("prewarm", now + burst_gap, "burst")
    if demand.rate_per_s < config.demote_below_per_s:
        return Prediction("demote", None, "cold")
    return None
