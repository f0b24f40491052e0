"""The cold-start benchmark's traces and the figures computed from one replay of them.

A trace mixes power-law traffic over a few popular adapters with many long-tail adapters, each called about
once per compressed "hour" (`hour_s` seconds), in one of two shapes:
- periodic: adapter j at its own phase plus k hours, moved by up to `jitter_share` of an hour either way
  (a job that runs hourly, give or take minutes);
- poisson: adapter j at the times of a Poisson process of one call per hour on average (memoryless: no
  history says when the next call comes).
The first `num_history_hours` hours build the usage history the predictor needs; the hours after them are
measured. One adapter is first called during the measured hours (its first call ever).
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from benchmarks.load import percentiles
from benchmarks.trace import FIRST_PROMPT_TOKEN_ID, TraceRequest, adapter_name, arrival_times_s, popularity

POPULAR, LONG_TAIL, FIRST_CALL = "popular", "long_tail", "first_call"
PERIODIC, POISSON = "periodic", "poisson"
TAILS = (PERIODIC, POISSON)
WARM_TIERS = ("device", "host")
TIERS = ("device", "host", "disk", "remote")
NUM_DECILES = 10
P99_RATIO_TARGET = 1.2  # issue 15: the long tail's TTFT p99 at most 1.2x the popular adapters'


@dataclass(frozen=True)
class ColdStartTraceConfig:
    tail: str = PERIODIC  # PERIODIC | POISSON
    num_popular: int = 6
    popular_rate_per_s: float = 1.5
    alpha: float = 1.0
    num_long_tail: int = 20
    hour_s: float = 8.0  # the compressed "hour": each long-tail adapter is called once per hour on average
    num_history_hours: int = 4  # calls before the measured hours (a period needs min_gaps + 1 calls)
    num_measured_hours: int = 4
    jitter_share: float = 5.0 / 60.0  # periodic: each call moves by up to this share of an hour either way
    prompt_len_range: tuple[int, int] = (16, 32)
    output_len_range: tuple[int, int] = (12, 12)
    vocab_size: int = 32000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.tail not in TAILS:
            raise ValueError(f"tail must be one of {', '.join(TAILS)}, got {self.tail!r}")
        if self.num_popular < 1 or self.num_long_tail < 1:
            raise ValueError("num_popular and num_long_tail must be >= 1")
        if self.popular_rate_per_s <= 0 or self.hour_s <= 0:
            raise ValueError("popular_rate_per_s and hour_s must be > 0")
        if self.num_history_hours < 0 or self.num_measured_hours < 1:
            raise ValueError("num_history_hours must be >= 0 and num_measured_hours >= 1")
        if not 0 <= self.jitter_share < 0.5:
            raise ValueError("jitter_share must be in [0, 0.5): an adapter's calls keep their order")

    @property
    def num_hours(self) -> int:
        return self.num_history_hours + self.num_measured_hours

    @property
    def duration_s(self) -> float:
        return self.num_hours * self.hour_s

    @property
    def measured_from_s(self) -> float:
        return self.num_history_hours * self.hour_s

    @property
    def jitter_s(self) -> float:
        return self.jitter_share * self.hour_s

    @property
    def popular_names(self) -> list[str]:
        return [adapter_name(i) for i in range(self.num_popular)]

    @property
    def long_tail_names(self) -> list[str]:
        return [adapter_name(self.num_popular + j) for j in range(self.num_long_tail)]

    @property
    def first_call_name(self) -> str:
        return adapter_name(self.num_popular + self.num_long_tail)

    @property
    def num_adapters(self) -> int:
        return self.num_popular + self.num_long_tail + 1


@dataclass(frozen=True)
class ColdStartRequest:
    request: TraceRequest
    kind: str  # POPULAR | LONG_TAIL | FIRST_CALL
    hour: int  # the compressed hour it arrives in
    measured: bool  # arrives after the history hours


def periodic_call_times_s(config: ColdStartTraceConfig, rng: np.random.Generator) -> list[list[float]]:
    """(num_long_tail, num_hours) call times: adapter j at phase_j + k * hour_s, moved by a uniform jitter of
    up to `jitter_s` either way; the phases are spread over the hour so the tail arrives at a steady rate."""
    spacing_s = config.hour_s / config.num_long_tail
    times = []
    for j in range(config.num_long_tail):
        phase_s = (j + 0.5) * spacing_s
        jitter = rng.uniform(-config.jitter_s, config.jitter_s, size=config.num_hours)
        times.append(
            [max(0.0, phase_s + k * config.hour_s + float(jitter[k])) for k in range(config.num_hours)]
        )
    return times


def poisson_call_times_s(config: ColdStartTraceConfig, rng: np.random.Generator) -> list[list[float]]:
    """Per long-tail adapter, the times of a Poisson process of one call per `hour_s` over the trace."""
    times = []
    for _ in range(config.num_long_tail):
        calls, t = [], float(rng.exponential(config.hour_s))
        while t < config.duration_s:
            calls.append(t)
            t += float(rng.exponential(config.hour_s))
        times.append(calls)
    return times


def generate_coldstart_trace(config: ColdStartTraceConfig) -> list[ColdStartRequest]:
    """The requests of one run in arrival order (the same config always gives the same trace; the popular
    traffic depends on the seed only, so both tails share it)."""
    rng = np.random.default_rng(config.seed)
    arrivals: list[tuple[float, str, str]] = []  # (arrival_s, adapter, kind)
    expected = config.popular_rate_per_s * config.duration_s
    popular_s = arrival_times_s(int(expected * 2) + 8, config.popular_rate_per_s, 1.0, rng)
    popular_s = popular_s[popular_s < config.duration_s]
    choices = rng.choice(
        config.num_popular, size=len(popular_s), p=popularity(config.num_popular, config.alpha)
    )
    arrivals.extend(
        (float(t), adapter_name(int(i)), POPULAR) for t, i in zip(popular_s, choices, strict=True)
    )
    tail_rng = np.random.default_rng([config.seed, TAILS.index(config.tail)])
    calls = (periodic_call_times_s if config.tail == PERIODIC else poisson_call_times_s)(config, tail_rng)
    names = config.long_tail_names
    for j, times in enumerate(calls):
        arrivals.extend((t, names[j], LONG_TAIL) for t in times)
    # Halfway through the measured hours, between two periodic long-tail calls.
    first_call_hour = config.num_history_hours + config.num_measured_hours // 2
    first_call_s = first_call_hour * config.hour_s + 0.25 * config.hour_s / config.num_long_tail
    arrivals.append((first_call_s, config.first_call_name, FIRST_CALL))
    arrivals.sort(key=lambda a: a[0])
    out = []
    for index, (t, adapter, kind) in enumerate(arrivals):
        prompt_len = int(rng.integers(config.prompt_len_range[0], config.prompt_len_range[1] + 1))
        output_len = int(rng.integers(config.output_len_range[0], config.output_len_range[1] + 1))
        prompt = rng.integers(FIRST_PROMPT_TOKEN_ID, config.vocab_size, size=prompt_len)
        request = TraceRequest(index, t, adapter, tuple(int(x) for x in prompt), output_len)
        out.append(ColdStartRequest(request, kind, int(t // config.hour_s), t >= config.measured_from_s))
    return out


# ---------------------------------------------------------------------------------------- the analysis


def load_window_s(record: dict) -> tuple[float, float] | None:
    """(start, end) on the client clock (seconds from the replay's t0) while this request's adapter was
    loading, or None. The worker received it at scheduled + send lag; its adapter landed before it was
    scheduled (`queue_ms` after arrival) and had been loading for `adapter_load_ms`."""
    load_ms, queue_ms = record.get("adapter_load_ms"), record.get("queue_ms")
    if record.get("error") or not load_ms or queue_ms is None:
        return None
    arrived_s = record["scheduled_s"] + record.get("send_lag_ms", 0.0) / 1000.0
    end_s = arrived_s + queue_ms / 1000.0
    return max(arrived_s, end_s - load_ms / 1000.0), end_s


def itl_intervals_s(record: dict) -> list[tuple[float, float, float]]:
    """(start, end, itl_ms) of each inter-token sample of a request, on the client clock: the first token
    came at scheduled + TTFT, each later one `itl_ms` after the one before."""
    if record.get("error") or record.get("ttft_ms") is None:
        return []
    t = record["scheduled_s"] + record["ttft_ms"] / 1000.0
    out = []
    for itl_ms in record["itl_ms"]:
        out.append((t, t + itl_ms / 1000.0, itl_ms))
        t += itl_ms / 1000.0
    return out


def _merge(windows: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(windows):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def split_itl_by_loads(
    records: Sequence[dict], prefetch_windows: Sequence[tuple[float, float]] = ()
) -> tuple[list[float], list[float], int]:
    """(ITL samples overlapping a load in flight, the others, number of load windows). Loads are the ones
    requests waited for and the hint-driven prefetches (`prefetch_windows`, client clock). A request's own
    load ends before its first token, so only other loads can overlap its samples."""
    windows = [w for w in (load_window_s(r) for r in records) if w is not None] + list(prefetch_windows)
    merged = _merge(windows)
    starts = [a for a, _ in merged]
    during, idle = [], []
    for record in records:
        for start, end, itl_ms in itl_intervals_s(record):
            i = bisect.bisect_left(starts, end) - 1  # last window starting before the sample ends
            (during if i >= 0 and merged[i][1] > start else idle).append(itl_ms)
    return during, idle, len(windows)


def summarize_kind(records: Sequence[dict]) -> dict:
    ok = [r for r in records if not r.get("error")]
    tiers = Counter(r.get("cache_tier") or "unknown" for r in ok)
    warm = sum(tiers[t] for t in WARM_TIERS)
    warm_ttft = [
        r["ttft_ms"] for r in ok if r.get("cache_tier") in WARM_TIERS and r.get("ttft_ms") is not None
    ]
    warm_ok = [r for r in ok if r.get("cache_tier") in WARM_TIERS]
    return {
        "requests": len(records),
        "errors": len(records) - len(ok),
        "ttft_ms": percentiles([r["ttft_ms"] for r in ok if r.get("ttft_ms") is not None]),
        "warm_ttft_ms": percentiles(warm_ttft),
        "server_ttft_ms": percentiles(
            [r["server_ttft_ms"] for r in ok if r.get("server_ttft_ms") is not None]
        ),
        "adapter_load_ms": percentiles([r["adapter_load_ms"] or 0.0 for r in ok]),
        # Where a warm call's time went, as the worker saw it: waiting to be scheduled, and its whole TTFT.
        "warm_queue_ms": percentiles([r["queue_ms"] for r in warm_ok if r.get("queue_ms") is not None]),
        "warm_server_ttft_ms": percentiles(
            [r["server_ttft_ms"] for r in warm_ok if r.get("server_ttft_ms") is not None]
        ),
        "tiers": dict(sorted(tiers.items())),
        "tier_shares": {t: tiers[t] / len(ok) if ok else None for t in TIERS},
        "warm_share": warm / len(ok) if ok else None,
    }


def popularity_deciles(requests: Sequence[ColdStartRequest], records: Sequence[dict]) -> list[dict]:
    """TTFT and adapter-load percentiles per popularity decile of the measured requests: adapters ranked
    by their number of measured requests (most first, ties by name), the ranking cut into ten groups of
    (nearly) equal numbers of adapters."""
    by_index = {r["index"]: r for r in records}
    measured = [r for r in requests if r.measured]
    counts = Counter(r.request.adapter for r in measured)
    ranked = sorted(counts, key=lambda name: (-counts[name], name))
    decile_of = {name: rank * NUM_DECILES // len(ranked) for rank, name in enumerate(ranked)}
    groups: list[list[dict]] = [[] for _ in range(NUM_DECILES)]
    for r in measured:
        groups[decile_of[r.request.adapter]].append(by_index[r.request.index])
    out = []
    for decile, group in enumerate(groups):
        ok = [r for r in group if not r.get("error")]
        out.append({
            "decile": decile + 1,
            "adapters": sum(1 for d in decile_of.values() if d == decile),
            "requests": len(group),
            "ttft_ms": percentiles([r["ttft_ms"] for r in ok if r.get("ttft_ms") is not None]),
            "adapter_load_ms": percentiles([r.get("adapter_load_ms") or 0.0 for r in ok]),
        })  # fmt: skip
    return out


def analyze(
    requests: Sequence[ColdStartRequest],
    records: Sequence[dict],
    prefetch_windows: Sequence[tuple[float, float]] = (),
) -> dict:
    """Figures of one pass: per kind over the measured hours, the first call, the history hours, ITL
    against load windows (prefetches included), popularity deciles."""
    by_index = {r["index"]: r for r in records}
    groups: dict[str, list[dict]] = {POPULAR: [], LONG_TAIL: [], FIRST_CALL: [], "history": []}
    for request in requests:
        record = by_index[request.request.index]
        groups[request.kind if request.measured else "history"].append(record)
    measured = [by_index[r.request.index] for r in requests if r.measured]
    measured_from_s = min((r.request.arrival_s for r in requests if r.measured), default=0.0)
    prefetches = [w for w in prefetch_windows if w[1] >= measured_from_s]
    during, idle, num_windows = split_itl_by_loads(measured, prefetches)
    itl = {
        "during_loads_ms": percentiles(during),
        "no_load_ms": percentiles(idle),
        "during_samples": len(during),
        "no_load_samples": len(idle),
        "load_windows": num_windows,
        "prefetch_windows": len(prefetches),
    }
    p99_during, p99_idle = itl["during_loads_ms"]["p99"], itl["no_load_ms"]["p99"]
    itl["p99_ratio"] = p99_during / p99_idle if p99_during is not None and p99_idle else None
    first = groups[FIRST_CALL][0] if groups[FIRST_CALL] else {}
    pop_ttft = _ttfts(groups[POPULAR])
    tail_ttft = _ttfts(groups[LONG_TAIL])
    warm_tail_ttft = _ttfts(r for r in groups[LONG_TAIL] if r.get("cache_tier") in WARM_TIERS)
    return {
        POPULAR: summarize_kind(groups[POPULAR]),
        LONG_TAIL: summarize_kind(groups[LONG_TAIL]),
        "history": summarize_kind(groups["history"]),
        FIRST_CALL: {
            "ttft_ms": first.get("ttft_ms"),
            "tier": first.get("cache_tier"),
            "adapter_load_ms": first.get("adapter_load_ms"),
            "error": first.get("error"),
        },
        "itl": itl,
        "deciles": popularity_deciles(requests, records),
        # 95% bootstrap intervals of the two latency targets' statistics: the noise of one pass.
        "intervals": {
            "warm_long_tail_ttft_p50_minus_popular_ms": bootstrap_interval(
                warm_tail_ttft, pop_ttft, lambda a, b: np.percentile(a, 50) - np.percentile(b, 50)
            ),
            "long_tail_ttft_p99_vs_popular": bootstrap_interval(tail_ttft, pop_ttft, _p99_ratio),
        },
        # Is the long tail slower at p99 than the popular adapters, or did the slowest calls fall to it by
        # chance? The p99 of a group of ~50 calls is about its largest one.
        "p99_ratio_by_chance": label_permutations(tail_ttft, pop_ttft, _p99_ratio, P99_RATIO_TARGET),
    }


def _ttfts(records) -> np.ndarray:
    return np.asarray(
        [r["ttft_ms"] for r in records if not r.get("error") and r.get("ttft_ms") is not None],
        dtype=np.float64,
    )


def bootstrap_interval(
    a: np.ndarray,
    b: np.ndarray,
    statistic,
    draws: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> list[float] | None:
    """The percentile bootstrap interval of `statistic(a, b)`: both samples resampled with replacement,
    independently, `draws` times. None when either sample is empty."""
    if len(a) == 0 or len(b) == 0:
        return None
    rng = np.random.default_rng(seed)
    values = np.empty(draws)
    for i in range(draws):
        values[i] = statistic(rng.choice(a, size=len(a)), rng.choice(b, size=len(b)))
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return [float(low), float(high)]


def _p99_ratio(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.percentile(a, 99) / np.percentile(b, 99))


def label_permutations(
    a: np.ndarray, b: np.ndarray, statistic, threshold: float, draws: int = 2000, seed: int = 0
) -> dict | None:
    """`statistic(a, b)` against its values when the calls of both groups are dealt out again at random
    (same group sizes), as if the group a call belongs to made no difference: the median of those values,
    the share of them at or above `threshold` (how often the target is missed by the deal alone) and at
    or above the observed value (the one-sided p-value of the observed difference). None when either
    group is empty."""
    if len(a) == 0 or len(b) == 0:
        return None
    observed = statistic(a, b)
    pooled = np.concatenate([a, b])
    rng = np.random.default_rng(seed)
    values = np.empty(draws)
    for i in range(draws):
        dealt = rng.permutation(pooled)
        values[i] = statistic(dealt[: len(a)], dealt[len(a) :])
    return {
        "observed": observed,
        "median": float(np.median(values)),
        "share_at_or_above_target": float(np.mean(values >= threshold)),
        "p_value": float(np.mean(values >= observed)),
        "sizes": [len(a), len(b)],
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def targets(hints_on: dict, tail: str, host_share: float, prefetches: dict | None = None) -> dict[str, dict]:
    """The issue's targets, checked on a hints-ON pass of `tail` (`host_share`: the share of the tail the
    host budget holds; `prefetches`: the worker's prefetch counters, when it exports them). A measured call
    that failed counts against them: it is no warm long-tail call, and the latency targets, whose
    statistics are taken over the calls that succeeded, are missed while any popular or long-tail call
    failed (as a capacity step is)."""
    pop, lt = hints_on[POPULAR], hints_on[LONG_TAIL]
    failed = pop["errors"] + lt["errors"]
    ratio = _ratio(lt["ttft_ms"]["p99"], pop["ttft_ms"]["p99"])
    # warm_share is over the calls served; here over every measured long-tail call
    served = lt["requests"] - lt["errors"]
    warm = lt["warm_share"] * served / lt["requests"] if lt["warm_share"] is not None else None
    warm_gap = (
        lt["warm_ttft_ms"]["p50"] - pop["ttft_ms"]["p50"]
        if lt["warm_ttft_ms"]["p50"] is not None and pop["ttft_ms"]["p50"] is not None
        else None
    )
    warm_target = 0.9 if tail == PERIODIC else host_share
    out = {
        "long_tail_warm_share": {
            "value": warm,
            "target": f">= {warm_target:.2f}",
            "met": warm is not None and warm >= warm_target,
        },
        "long_tail_ttft_p99_vs_popular": {
            "value": ratio,
            "target": f"<= {P99_RATIO_TARGET}",
            "met": failed == 0 and ratio is not None and ratio <= P99_RATIO_TARGET,
            "failed_calls": failed,
        },
        "warm_long_tail_ttft_p50_minus_popular_ms": {
            "value": warm_gap,
            "target": "<= 5 ms",
            "met": failed == 0 and warm_gap is not None and warm_gap <= 5.0,
            "failed_calls": failed,
        },
    }
    for key, interval in hints_on.get("intervals", {}).items():
        if key in out:
            out[key]["ci95"] = interval
    if hints_on.get("p99_ratio_by_chance") is not None:
        out["long_tail_ttft_p99_vs_popular"]["by_chance"] = hints_on["p99_ratio_by_chance"]
    wasted = (prefetches or {}).get("wasted_share")
    out["wasted_prefetch_share"] = {
        "value": wasted,
        "target": "<= 0.10",
        "met": wasted is not None and wasted <= 0.1,
    }
    return out


# ------------------------------------------------------------------------------- why a call was cold

# Why a measured long-tail call was served from disk or remote, from what the benchmark observes: the hint
# stream and the worker's debug log (events keyed by the first 12 hex digits of the adapter's sha256).
NO_HINT = "no_hint"  # no prewarm hint was published between the adapter's previous call and this one
HINT_LATE = "hint_late"  # published before the call, but the worker logged it only after the call came
NO_ROOM = "skipped_no_room"  # the worker declined the prefetch: its host tier could not keep it
HOST_DECLINED = "host_declined"  # the prefetch was read, but the host tier did not keep it
EVICTED_FROM_HOST = "evicted_from_host"  # its host copy made room for another adapter before the call
LEFT_SLOT = "left_slot"  # it left a device slot holding no host copy (a prefetch skipped as held there)
IN_FLIGHT = "prefetch_in_flight"  # its prefetch had not landed when the call came
UNEXPLAINED = "unexplained"  # hinted and prefetched, nothing logged took it away
WHY_COLD = (NO_HINT, HINT_LATE, NO_ROOM, HOST_DECLINED, EVICTED_FROM_HOST, LEFT_SLOT, IN_FLIGHT, UNEXPLAINED)
_LOSSES = {"skipped_no_room": NO_ROOM, "host_declined": HOST_DECLINED, "host_evicted": EVICTED_FROM_HOST,
           "left_slot": LEFT_SLOT}  # fmt: skip


def why_cold(
    calls: Sequence[tuple[str, float, float | None]],
    hints: Sequence[dict],
    events: Sequence[dict],
) -> list[str]:
    """The reason (one of WHY_COLD) each cold call was cold. `calls`: (key, arrival, previous call's
    arrival or None) in Unix seconds; `hints`: prewarm hints ({"key", "issued_at"}); `events`: the worker's
    log events ({"at_s", "event", "key"}, event one of "hint", "prefetch_started", "skipped_no_room",
    "skipped_held", "host_declined", "host_evicted", "left_slot", "prefetch_loaded").

    The last loss (no room, declined, evicted from host, left its slot) logged between the worker taking
    the hint and the call is the reason; without one, a prefetch started and not loaded is in flight."""
    out = []
    for key, arrived, previous in calls:
        since = -math.inf if previous is None else previous
        issued = [h["issued_at"] for h in hints if h["key"] == key and since < h["issued_at"] <= arrived]
        if not issued:
            out.append(NO_HINT)
            continue
        mine = sorted(
            (e for e in events if e["key"] == key and min(issued) <= e["at_s"] <= arrived),
            key=lambda e: e["at_s"],
        )
        if not any(e["event"] == "hint" for e in mine):
            out.append(HINT_LATE)
            continue
        reason, started, loaded = UNEXPLAINED, False, False
        for event in mine:
            if event["event"] in _LOSSES:
                reason = _LOSSES[event["event"]]
            elif event["event"] == "prefetch_started":
                started, loaded = True, False
            elif event["event"] == "prefetch_loaded":
                loaded = True
        if reason == UNEXPLAINED and started and not loaded:
            reason = IN_FLIGHT
        out.append(reason)
    return out


def cold_calls(
    requests: Sequence[ColdStartRequest], records: Sequence[dict], t0_wall_s: float, key_of: dict[str, str]
) -> list[tuple[str, float, float | None]]:
    """(key, arrival, previous arrival) in Unix seconds of each measured long-tail call served from disk
    or remote; `key_of` maps an adapter name to its key (sha256 prefix). Arrival is when the worker got it
    (scheduled + send lag)."""
    by_index = {r["index"]: r for r in records}
    last: dict[str, float] = {}
    out = []
    for request in requests:
        record = by_index[request.request.index]
        arrived = t0_wall_s + record["scheduled_s"] + record.get("send_lag_ms", 0.0) / 1000.0
        name = request.request.adapter
        previous = last.get(name)
        last[name] = arrived
        if request.kind != LONG_TAIL or not request.measured or record.get("error"):
            continue
        if record.get("cache_tier") not in WARM_TIERS:
            out.append((key_of[name], arrived, previous))
    return out
