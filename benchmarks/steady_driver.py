"""Keeping an engine at a steady number of running requests and timing its decode steps one by one.

`SteadyDriver` holds an engine at `num_requests` requests, replacing each that finishes, and times each
step; a step counts as steady when every request is running and decoding one token. `SkewedDriver` takes
each new request's adapter from a popularity trace. `run_interleaved` steps several drivers in turn so
that all of them see the same machine load. Shared by engine_bench, ensemble_bench and profile_step.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.trace import popularity
from data_plane.engine.config import EngineConfig
from data_plane.engine.llm_engine import LLMEngine
from data_plane.engine.request import AdapterRef, EngineRequest, SamplingOptions
from openlora.artifact import digest_dir

NUM_REQUESTS = 32
NUM_SLOTS = 32
PROMPT_TOKENS = 32
BLOCK_SIZE = 16
HOST_CACHE_BYTES = 2 << 30  # holds engine_bench's 100 skewed adapters as fp32 (about 0.7 GiB)


def popularity_draws(num_adapters: int, alpha: float, count: int, seed: int = 0) -> list[int]:
    """`count` adapter indices drawn independently, index k with probability proportional to (k+1)^-alpha."""
    rng = np.random.default_rng(seed)
    return rng.choice(num_adapters, size=count, p=popularity(num_adapters, alpha)).tolist()


@dataclass
class SteadyDriver:
    """Keeps one engine at `num_requests` requests (request i always on adapters[i], if any) and times its
    steps; a step counts when all requests were running and decoding one token each.

    `waves`: the requests of a (re)start come in that many waves, wave w decoding (w + 1) / waves of
    `decode_tokens` (at least 2), so that from then on a wave finishes, and is replaced, every
    decode_tokens / waves steps instead of all requests at once.

    `settle_loads`: after each step, wait for this engine's adapter loads in flight and count the wait in
    the step's time, so that a copy into a slot is charged to the engine that needs it and never runs on
    the loader thread during another engine's timed step."""

    name: str
    engine: LLMEngine
    adapters: list[AdapterRef] | None
    decode_tokens: int
    num_requests: int = NUM_REQUESTS
    waves: int = 1
    settle_loads: bool = False
    num_added: int = 0

    def __post_init__(self) -> None:
        self.place_of_request: dict[str, int] = {}
        self._start()

    def request(self, i: int, request_id: str, prompt: list[int], sampling: SamplingOptions) -> EngineRequest:
        """The request kept in place i (the same place always gets the same adapters)."""
        adapters = (self.adapters[i % len(self.adapters)],) if self.adapters else ()
        return EngineRequest(request_id, prompt, sampling, adapters)

    def _start(self) -> None:
        # Per timed step: distinct adapters in the batch, mean tokens of context per sequence.
        self.distinct_adapters: list[int] = []
        self.context_tokens: list[float] = []
        self.load_counts_at_start = Counter(self.engine.load_counts)
        # Every step since the (re)start, steady or not: tokens and seconds.
        self.tokens_since_start, self.seconds_since_start = 0, 0.0
        for i in range(self.num_requests):
            wave = i * self.waves // self.num_requests
            self._add(i, max(2, math.ceil(self.decode_tokens * (wave + 1) / self.waves)))

    def _add(self, i: int, max_tokens: int) -> None:
        vocab = self.engine.spec.vocab_size
        prompt = [(7 * i + 13 * self.num_added + j) % (vocab - 100) + 50 for j in range(PROMPT_TOKENS)]
        request_id = f"{self.name}-{self.num_added}"
        self.num_added += 1
        self.place_of_request[request_id] = i
        sampling = SamplingOptions(max_tokens=max_tokens)
        self.engine.add_request(self.request(i, request_id, prompt, sampling))

    def restart(self) -> None:
        """Aborts every request and adds fresh ones, so drivers restarted together stay in phase (same
        context lengths at the same interleaved step); the per-step records start again."""
        for request_id in list(self.place_of_request):
            self.engine.abort(request_id)
        self.place_of_request.clear()
        self._start()

    def loads_since_start(self) -> dict[str, int]:
        """Adapter loads finished since the last (re)start, by "cause/source tier"."""
        counts = Counter(self.engine.load_counts)
        counts.subtract(self.load_counts_at_start)
        return {f"{cause}/{tier}": n for (cause, tier), n in sorted(counts.items()) if n > 0}

    def is_steady(self) -> bool:
        return self.engine.num_running == self.num_requests and all(
            s.num_pending_tokens == 1 for s in self.engine.scheduler.running
        )

    def step(self) -> float | None:
        """One engine step; its time in seconds if it was a steady decode step, else None."""
        steady = self.is_steady()
        if steady:
            running = self.engine.scheduler.running
            keys = {s.adapter_key for s in running if s.adapter_key is not None}
            context = sum(s.num_tokens for s in running) / len(running)
        started = time.perf_counter()
        outputs = self.engine.step()
        if self.settle_loads and self.adapters:
            self.engine.loader.wait_for({a.key for a in self.adapters}, timeout_s=60.0)
        elapsed_s = time.perf_counter() - started
        new_tokens = sum(len(o.new_token_ids) for o in outputs)
        self.last_step_s, self.last_new_tokens = elapsed_s, new_tokens
        self.tokens_since_start += new_tokens
        self.seconds_since_start += elapsed_s
        for output in outputs:
            if output.error is not None:
                raise RuntimeError(f"{self.name} request {output.request_id} failed") from output.error
            place = self.place_of_request.get(output.request_id)
            if output.finished and place is not None:  # aborted requests were already replaced
                del self.place_of_request[output.request_id]
                self._add(place, self.decode_tokens)
        if steady and new_tokens == self.num_requests:
            self.distinct_adapters.append(len(keys))
            self.context_tokens.append(context)
            return elapsed_s
        return None


@dataclass
class SkewedDriver(SteadyDriver):
    """A SteadyDriver whose every new request takes the next adapter of `draws` (indices into
    `adapters`, e.g. popularity_draws), whichever place it fills."""

    draws: list[int] = field(default_factory=list)
    num_drawn: int = 0

    def request(self, i: int, request_id: str, prompt: list[int], sampling: SamplingOptions) -> EngineRequest:
        adapter = self.adapters[self.draws[self.num_drawn % len(self.draws)]]
        self.num_drawn += 1
        return EngineRequest(request_id, prompt, sampling, (adapter,))

    def _start(self) -> None:
        self.drawn_at_start = self.num_drawn
        super()._start()

    def drawn_since_start(self) -> list[int]:
        """The adapter indices of the requests added since the last (re)start."""
        return [self.draws[k % len(self.draws)] for k in range(self.drawn_at_start, self.num_drawn)]


def make_engine(
    model_dir: Path, num_requests: int, decode_tokens: int, max_lora_rank: int, num_slots: int = NUM_SLOTS
) -> LLMEngine:
    """An fp32 CPU engine whose KV cache holds `num_requests` whole requests (so none is preempted)."""
    blocks_per_request = math.ceil((PROMPT_TOKENS + decode_tokens) / BLOCK_SIZE) + 1
    return LLMEngine(
        EngineConfig(
            model_dir=model_dir,
            dtype="float32",
            num_adapter_slots=num_slots,
            max_num_seqs=num_requests,
            max_num_batched_tokens=2048,
            num_kv_blocks=blocks_per_request * num_requests,
            block_size=BLOCK_SIZE,
            max_lora_rank=max_lora_rank,
            host_cache_bytes=HOST_CACHE_BYTES,
        )
    )


def adapter_refs(dirs: list[Path]) -> list[AdapterRef]:
    return [AdapterRef(digest_dir(d), d) for d in dirs]


def prefetch_to_host(engine: LLMEngine, refs: list[AdapterRef], timeout_s: float = 600.0) -> int:
    """Reads every adapter into the engine's host tier (as prewarm hints would); returns how many are there."""
    for ref in refs:
        engine.prefetch(ref.key, (ref,))
    deadline = time.monotonic() + timeout_s
    while engine.has_unfinished():
        if time.monotonic() > deadline:
            raise RuntimeError(f"adapters not in host memory after {timeout_s} s")
        engine.step()
    return len({ref.key for ref in refs} & set(engine.host_adapter_keys()))


def run_interleaved(
    drivers: dict[str, SteadyDriver], steps: int, warmup_steps: int
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Warms every engine up (adapters loaded, `warmup_steps` steady steps each, discarded), restarts all
    request sets together, then steps each engine in turn until each has `steps` steady steps (an engine
    that has them is not stepped further). Returns each engine's step times in seconds and the unsteady
    steps it skipped."""
    times_s: dict[str, list[float]] = {tag: [] for tag in drivers}
    unsteady = dict.fromkeys(drivers, 0)
    for phase_steps in (max(warmup_steps, 1), steps):
        if phase_steps == steps:
            for tag, driver in drivers.items():
                driver.restart()
                times_s[tag] = []
        max_calls = 20 * phase_steps + 1000  # guards against an engine that never gets steady
        for _ in range(max_calls):
            if all(len(t) >= phase_steps for t in times_s.values()):
                break
            for tag, driver in drivers.items():
                if len(times_s[tag]) >= phase_steps:
                    continue
                elapsed_s = driver.step()
                if elapsed_s is None:
                    unsteady[tag] += 1
                else:
                    times_s[tag].append(elapsed_s)
        else:
            counts = {tag: len(t) for tag, t in times_s.items()}
            raise RuntimeError(f"engines not steady after {max_calls} steps: {counts}")
    return times_s, unsteady
