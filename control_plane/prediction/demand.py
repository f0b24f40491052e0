"""Per-adapter demand from request times: EWMA rate, gap distribution, and the hint it calls for.

Plain Python over Unix seconds, so the clock can be compressed in tests and benchmarks:
- periodic (at least `min_gaps` gaps, at least `periodic_min_share` of them within `periodic_tolerance`
  of a whole number of median gaps, so a few jittered or missed calls do not hide the period, and a grid
  that tight would hold that many gaps of memoryless calls at the same pace with a probability of at most
  `significance`, so a few random calls that happen to line up are not taken for a job): the next
  call is expected one median gap after the last; prewarm from the lead time before it (`lead_gap_share`
  of the gap, within [`lead_s`, `max_lead_s`], plus as far as its gaps strayed from the grid, so a call
  that comes that much early still finds it warm) until half a gap after. After a missed call the next one
  on the grid is prewarmed; after more than `MAX_MISSED_CALLS` in a row the period is no longer trusted.
- hot (EWMA rate at least `resident_rate_per_s`): no hint; an adapter called that often stays resident in
  the workers that serve it, and hinting it every pass would only flood the stream.
- bursty (the calls within the rate window came at least `BURST_RATE_FACTOR` times as fast as those
  before it, that many calls in the window would come from memoryless calls at the earlier pace with a
  probability of at most `significance`, and the last call is recent compared with the typical gap inside
  the burst): prewarm while calls keep coming, with the deadline one typical gap ahead.
- otherwise, an adapter whose EWMA rate fell below `demote_below_per_s` gets a demote.
"""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass, fields

# A periodic adapter is prewarmed for the next call on its grid after at most this many predicted calls
# in a row did not come (a job that skips a run); after more, it gets no prewarm until a call comes.
MAX_MISSED_CALLS = 1
# Calls within the rate window make a burst when they come at least this many times as fast as before it.
BURST_RATE_FACTOR = 2.0


@dataclass(frozen=True)
class PredictorConfig:
    rate_time_constant_s: float = 600.0
    lead_s: float = 5.0  # prewarm at least this long before a predicted call
    lead_gap_share: float = 0.2  # ... or this share of the period, when longer
    max_lead_s: float = 600.0
    min_gaps: int = 3
    periodic_tolerance: float = 0.25  # a gap within this share of a whole number of periods is on the grid
    periodic_min_share: float = 0.75  # periodic when at least this share of the gaps are on the grid
    # A period or a burst counts only when memoryless calls at the adapter's pace would show it this rarely.
    significance: float = 0.05
    resident_rate_per_s: float = 0.5  # hot: no hints at all
    burst_gap_factor: float = 4.0  # still in the burst while the last call is within this many gaps
    demote_below_per_s: float = 1e-3
    history_s: float = 7 * 24 * 3600.0

    def __post_init__(self) -> None:
        for name in FIELD_NAMES:
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if self.rate_time_constant_s <= 0 or self.lead_s < 0 or self.min_gaps < 2:
            raise ValueError("rate_time_constant_s must be > 0, lead_s >= 0, min_gaps >= 2")
        if not 0 <= self.lead_gap_share < 1 or self.max_lead_s < self.lead_s:
            raise ValueError("lead_gap_share must be in [0, 1) and max_lead_s >= lead_s")
        if not 0 < self.periodic_tolerance < 0.5 or not 0 < self.periodic_min_share <= 1:
            raise ValueError("periodic_tolerance must be in (0, 0.5) and periodic_min_share in (0, 1]")
        if not 0 < self.significance <= 1:
            raise ValueError("significance must be in (0, 1]")
        if self.resident_rate_per_s <= 0 or self.burst_gap_factor <= 0 or self.history_s <= 0:
            raise ValueError("resident_rate_per_s, burst_gap_factor and history_s must be > 0")
        if not 0 <= self.demote_below_per_s < self.resident_rate_per_s:
            raise ValueError("demote_below_per_s must be >= 0 and below resident_rate_per_s")

    def lead_for(self, period_s: float) -> float:
        """Seconds before a periodic call to prewarm it: proportional to the period, within bounds."""
        return min(max(self.lead_s, self.lead_gap_share * period_s), self.max_lead_s)


FIELD_NAMES = tuple(f.name for f in fields(PredictorConfig))


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
    gap_s: float | None = None  # the period, or the typical gap inside the burst


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


def period_of(times: list[float], config: PredictorConfig) -> float | None:
    """The period of sorted `times` when most gaps sit on a grid of the median gap, tightly enough that
    memoryless calls would rarely do as well (`grid_chance` <= `significance`), else None."""
    gaps = [b - a for a, b in itertools.pairwise(times) if b > a]
    if len(gaps) < config.min_gaps:
        return None
    period = statistics.median(gaps)
    deviations = []  # of the gaps on the grid, in periods
    for gap in gaps:
        periods = round(gap / period)
        if periods >= 1 and abs(gap / period - periods) <= config.periodic_tolerance:
            deviations.append(abs(gap / period - periods))
    if len(deviations) < config.periodic_min_share * len(gaps):
        return None
    # The median gap is on the grid by construction: the evidence is how the other gaps fall.
    chance = grid_chance(len(gaps) - 1, len(deviations) - 1, max(deviations))
    return period if chance <= config.significance else None


# Gaps deviating less than this share of a period count as this close (clock and logging resolution): a
# grid is never taken as tighter than that, however exactly a few calls lined up.
MIN_GRID_DEVIATION = 0.02


def grid_chance(num_gaps: int, num_on_grid: int, deviation: float) -> float:
    """The probability that of `num_gaps` gaps between memoryless (Poisson) calls with the same median gap,
    at least `num_on_grid` fall within `deviation` periods of a whole number (>= 1) of median gaps.

    A memoryless gap is exponential; with median 1 its distribution function is 1 - 2^-x, so one gap lands
    within d of k >= 1 periods with probability sum_k 2^-(k - d) - 2^-(k + d); the count on the grid is
    binomial. Two gaps besides the median one within a quarter period of the grid: 0.12 (random calls
    often do that); within five minutes of an hourly grid: 0.013."""
    d = min(max(deviation, MIN_GRID_DEVIATION), 0.5)
    p = sum(2.0 ** -(k - d) - 2.0 ** -(k + d) for k in range(1, 64))
    return sum(
        math.comb(num_gaps, j) * p**j * (1 - p) ** (num_gaps - j) for j in range(num_on_grid, num_gaps + 1)
    )


def grid_spread(times: list[float], period: float, tolerance: float) -> float:
    """The farthest a gap of sorted `times` on the grid (within `tolerance` periods of a whole number of
    periods) strayed from it, in seconds: how much earlier than expected the next call may come."""
    deviations = [
        abs(gap - max(round(gap / period), 1) * period)
        for a, b in itertools.pairwise(times)
        if (gap := b - a) > 0
    ]
    return max((d for d in deviations if d <= tolerance * period), default=0.0)


def _faster_than_before(times: list[float], num_recent: int, now: float, config: PredictorConfig) -> bool:
    """Whether the `num_recent` last of sorted `times`, those within the rate window before `now`, came at
    least BURST_RATE_FACTOR times as fast as the calls before the window did, and too many for chance at
    that pace (`significance`); True without calls before it: nothing says they are the usual pace. A
    steady stream, however fast against the window, is no burst: memoryless calls at their usual rate say
    nothing about when the next one comes."""
    before = times[: len(times) - num_recent]
    window_start = now - config.rate_time_constant_s
    if not before or window_start <= before[0]:
        return True
    expected = len(before) / (window_start - before[0]) * config.rate_time_constant_s  # calls in a window
    return (
        num_recent >= BURST_RATE_FACTOR * expected
        and poisson_tail(num_recent, expected) <= config.significance
    )


def poisson_tail(count: int, mean: float) -> float:
    """P(N >= count) for N Poisson with this mean: how often memoryless calls at the usual pace would put
    `count` or more calls in one window. At one call per window on average, 4 calls happen 1.9% of the
    time; at two, 4 calls happen 14% of the time (twice the pace, yet no sign of a burst)."""
    term = math.exp(-mean)
    below = 0.0
    for k in range(count):
        below += term
        term *= mean / (k + 1)
    return max(0.0, 1.0 - below)


def predict(times: list[float], now: float, config: PredictorConfig) -> Prediction | None:
    """The hint an adapter's history calls for at `now`, or None."""
    times = sorted(times)
    demand = demand_of(times, now, config)
    period = period_of(times, config)
    if period is not None:
        next_at, missed = demand.last_at + period, 0
        while next_at + period / 2 < now:  # calls were missed: the next one on the grid
            next_at, missed = next_at + period, missed + 1
        if missed <= MAX_MISSED_CALLS:
            # A call may come as early as its gaps have strayed from the grid: prewarm that much sooner.
            lead_s = min(
                config.lead_for(period) + grid_spread(times, period, config.periodic_tolerance),
                config.max_lead_s,
            )
            if next_at - lead_s <= now:
                return Prediction("prewarm", next_at, "periodic", period)
            return None  # between calls: nothing to do yet
        # More predicted calls than that did not come: the grid no longer says when the next one comes
        # (the job stopped, or the gaps only looked periodic), and every prewarm on it is a wasted load.
        # Nor is it a burst still going: its calls were a period apart, and that many periods passed.
    if demand.rate_per_s >= config.resident_rate_per_s:
        return None  # hot: resident wherever it is served
    recent = [t for t in times if now - t <= config.rate_time_constant_s]
    if len(recent) >= 3 and period is None and _faster_than_before(times, len(recent), now, config):
        burst_gap = statistics.median(b - a for a, b in itertools.pairwise(recent))
        if now - demand.last_at <= config.burst_gap_factor * max(burst_gap, 1e-3):
            return Prediction("prewarm", now + burst_gap, "burst", burst_gap)
    if demand.rate_per_s < config.demote_below_per_s:
        return Prediction("demote", None, "cold")
    return None
