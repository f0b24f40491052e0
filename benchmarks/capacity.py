"""Capacity: the highest request rate a configuration sustains with TTFT p99 under a bound.

A search runs a fixed number of steps, each an open-loop replay at one rate:
- geometric: from `start_rate_per_s`, the rate is multiplied by `growth` after a sustained step and divided
  by it after a failed one, until one rate has passed and one has failed;
- bisection: then the geometric mean of the highest sustained and the lowest failed rate.
A step is sustained when every request succeeded and the TTFT p99 is at most the bound. The capacity is
the highest sustained rate; it is a lower bound only when no step failed. `CapacitySearch` takes one
step at a time, so that the searches of several configurations can alternate on a shared machine.

Every step of one configuration draws its adapters from an `AdapterSchedule`, which spreads one request
for each of the configuration's adapters evenly over the steps (so every adapter is requested during
the search) and draws the other requests from the power law.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from benchmarks.trace import Trace, TraceConfig, TraceRequest, adapter_name, generate_trace, popularity

# Share of a step's requests that may be coverage requests: the rest follows the power law.
COVER_SHARE = 0.8


@dataclass(frozen=True)
class SearchConfig:
    start_rate_per_s: float
    ttft_p99_bound_ms: float = 1000.0
    growth: float = 1.3
    num_steps: int = 5

    def __post_init__(self) -> None:
        if not self.start_rate_per_s > 0:
            raise ValueError(f"start_rate_per_s must be > 0, got {self.start_rate_per_s}")
        if not self.ttft_p99_bound_ms > 0:
            raise ValueError(f"ttft_p99_bound_ms must be > 0, got {self.ttft_p99_bound_ms}")
        if not self.growth > 1:
            raise ValueError(f"growth must be > 1, got {self.growth}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")


@dataclass(frozen=True)
class StepOutcome:
    rate_per_s: float
    ttft_p99_ms: float | None
    errors: int
    sustained: bool


@dataclass(frozen=True)
class Capacity:
    # Highest sustained rate; 0.0 when no step was sustained.
    rate_per_s: float
    # Lowest failed rate; None when every step was sustained (then rate_per_s is a lower bound).
    failed_rate_per_s: float | None
    steps: tuple[StepOutcome, ...]

    @property
    def bracketed(self) -> bool:
        return self.rate_per_s > 0 and self.failed_rate_per_s is not None


def is_sustained(summary: dict, ttft_p99_bound_ms: float) -> bool:
    """A load summary (`benchmarks.load.summarize`) meets the bound: no error and TTFT p99 <= bound."""
    p99 = summary["ttft_ms"]["p99"]
    return summary["errors"] == 0 and p99 is not None and p99 <= ttft_p99_bound_ms


class CapacitySearch:
    """The search of one configuration, one step at a time: `next_rate()` names the step's rate,
    `record(summary)` takes its load summary. Several searches can be interleaved step by step."""

    def __init__(self, config: SearchConfig) -> None:
        self.config = config
        self.steps: list[StepOutcome] = []
        self._good: float | None = None
        self._bad: float | None = None

    @property
    def done(self) -> bool:
        return len(self.steps) >= self.config.num_steps

    def next_rate(self) -> float:
        if self._good is None and self._bad is None:
            return self.config.start_rate_per_s
        if self._bad is None:
            return self._good * self.config.growth
        if self._good is None:
            return self._bad / self.config.growth
        return math.sqrt(self._good * self._bad)

    def record(self, summary: dict) -> StepOutcome:
        """Takes the load summary of a step run at `next_rate()` ("errors", "ttft_ms": {"p99": ...})."""
        if self.done:
            raise ValueError(f"the search has run its {self.config.num_steps} steps")
        rate = self.next_rate()
        ok = is_sustained(summary, self.config.ttft_p99_bound_ms)
        if ok:
            self._good = rate if self._good is None else max(self._good, rate)
        else:
            self._bad = rate if self._bad is None else min(self._bad, rate)
        outcome = StepOutcome(rate, summary["ttft_ms"]["p99"], summary["errors"], ok)
        self.steps.append(outcome)
        return outcome

    def result(self) -> Capacity:
        return Capacity(rate_per_s=self._good or 0.0, failed_rate_per_s=self._bad, steps=tuple(self.steps))


def find_capacity(measure: Callable[[int, float], dict], config: SearchConfig) -> Capacity:
    """Runs `config.num_steps` steps; `measure(step_index, rate_per_s)` replays one step and returns its
    load summary (at least "errors" and "ttft_ms": {"p99": ms or None})."""
    search = CapacitySearch(config)
    while not search.done:
        search.record(measure(len(search.steps), search.next_rate()))
    return search.result()


class AdapterSchedule:
    """Adapter names for the successive steps of one configuration's search.

    Over `num_steps` steps each of the `num_adapters` adapters is requested at least once: every step
    takes its share of the adapters not yet requested (in a random order), and draws its other requests
    from the power law over all of them."""

    def __init__(self, num_adapters: int, alpha: float, num_steps: int, seed: int) -> None:
        if num_adapters < 1:
            raise ValueError(f"num_adapters must be >= 1, got {num_adapters}")
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self.num_adapters, self.num_steps = num_adapters, num_steps
        self._rng = np.random.default_rng(seed)
        self._p = popularity(num_adapters, alpha)
        self._uncovered = list(self._rng.permutation(num_adapters))
        self.steps_taken = 0
        self.requested: set[int] = set()

    def cover_quota(self) -> int:
        """Adapters not requested yet that the next step must request."""
        steps_left = max(1, self.num_steps - self.steps_taken)
        return math.ceil(len(self._uncovered) / steps_left)

    def min_requests(self) -> int:
        """The fewest requests the next step may have so that coverage keeps to at most COVER_SHARE of it."""
        return math.ceil(self.cover_quota() / COVER_SHARE)

    def next_step(self, num_requests: int) -> list[str]:
        """(num_requests,) adapter names in request order for the next step."""
        quota = self.cover_quota()
        if num_requests < quota:
            raise ValueError(f"num_requests must be >= the step's coverage quota {quota}, got {num_requests}")
        cover = [int(i) for i in self._uncovered[:quota]]
        del self._uncovered[:quota]
        rest = self._rng.choice(self.num_adapters, size=num_requests - quota, p=self._p)
        ids = self._rng.permutation(np.concatenate([np.array(cover, dtype=np.int64), rest]))
        self.steps_taken += 1
        self.requested.update(int(i) for i in ids)
        return [adapter_name(int(i)) for i in ids]


def step_trace(base: TraceConfig, rate_per_s: float, adapters: list[str], num_adapters: int) -> Trace:
    """The trace of one step, one request per entry of `adapters` (in order): Gamma arrivals at
    `rate_per_s`, lengths and prompts from `base`'s seed (so every configuration gets the same ones at a
    given step). Its header names `num_adapters`, the configuration's; its requests hold the adapters."""
    num_requests = len(adapters)
    config = replace(base, num_requests=num_requests, num_adapters=0, rate_per_s=rate_per_s)
    trace = generate_trace(config)
    requests: tuple[TraceRequest, ...] = tuple(
        replace(r, adapter=name) for r, name in zip(trace.requests, adapters, strict=True)
    )
    return Trace(config=replace(config, num_adapters=num_adapters), requests=requests)
