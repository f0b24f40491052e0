"""Synthetic multi-adapter workload in the style of S-LoRA's evaluation, written to and read from JSONL.

Adapter popularity follows a power law over ranks: the adapter of rank k (1-based) is chosen with
probability proportional to k ** -alpha (alpha 0 is uniform; larger alpha concentrates traffic on the
first adapters). Inter-arrival gaps are Gamma-distributed with mean 1 / rate and coefficient of variation
`cv` (cv 1 is a Poisson process); rate inf puts every arrival at t = 0 (offline). Prompt and output
lengths are uniform over inclusive ranges. The prompt token ids are part of the trace, so every system
replaying it receives exactly the same input.

    python -m benchmarks.trace --num-requests 256 --num-adapters 100 --alpha 1 --out trace.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

# Token ids below this value are left out of prompts: small ids are the tokenizer's special tokens.
FIRST_PROMPT_TOKEN_ID = 16


def adapter_name(index: int, prefix: str = "lora-") -> str:
    """Name under which the benchmark registers adapter number `index`."""
    return f"{prefix}{index:05d}"


@dataclass(frozen=True)
class TraceConfig:
    num_requests: int
    num_adapters: int
    alpha: float = 1.0
    rate_per_s: float = math.inf
    cv: float = 1.0
    prompt_len_range: tuple[int, int] = (16, 64)
    output_len_range: tuple[int, int] = (16, 32)
    vocab_size: int = 32000
    seed: int = 0
    adapter_prefix: str = "lora-"
    # Every adapter is requested at least once (needs num_requests >= num_adapters); the remaining
    # requests follow the power law, and the order of all of them is shuffled.
    cover_all_adapters: bool = False

    def __post_init__(self) -> None:
        if self.num_requests < 0:
            raise ValueError(f"num_requests must be >= 0, got {self.num_requests}")
        if self.num_adapters < 0:
            raise ValueError(f"num_adapters must be >= 0 (0 = base model only), got {self.num_adapters}")
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if not self.rate_per_s > 0:
            raise ValueError(f"rate_per_s must be > 0 (inf = offline), got {self.rate_per_s}")
        if self.cv < 0:
            raise ValueError(f"cv must be >= 0, got {self.cv}")
        for label, (low, high) in (
            ("prompt_len_range", self.prompt_len_range),
            ("output_len_range", self.output_len_range),
        ):
            if not 1 <= low <= high:
                raise ValueError(f"{label} must satisfy 1 <= min <= max, got ({low}, {high})")
        if self.cover_all_adapters and self.num_requests < self.num_adapters:
            raise ValueError(
                f"cover_all_adapters needs num_requests >= num_adapters, got {self.num_requests} < {self.num_adapters}"
            )
        if self.vocab_size <= FIRST_PROMPT_TOKEN_ID:
            raise ValueError(f"vocab_size must be > {FIRST_PROMPT_TOKEN_ID}, got {self.vocab_size}")

    @property
    def offline(self) -> bool:
        return math.isinf(self.rate_per_s)

    def to_json(self) -> dict:
        data = asdict(self)
        data["rate_per_s"] = None if self.offline else self.rate_per_s
        data["prompt_len_range"] = list(self.prompt_len_range)
        data["output_len_range"] = list(self.output_len_range)
        return data

    @classmethod
    def from_json(cls, data: dict) -> TraceConfig:
        data = dict(data)
        data["rate_per_s"] = math.inf if data.get("rate_per_s") is None else float(data["rate_per_s"])
        data["prompt_len_range"] = tuple(data["prompt_len_range"])
        data["output_len_range"] = tuple(data["output_len_range"])
        return cls(**data)


@dataclass(frozen=True)
class TraceRequest:
    index: int
    arrival_s: float
    # Adapter name; "" means the base model alone.
    adapter: str
    prompt_token_ids: tuple[int, ...]
    max_tokens: int

    def to_json(self) -> dict:
        return {
            "index": self.index,
            "arrival_s": self.arrival_s,
            "adapter": self.adapter,
            "prompt_token_ids": list(self.prompt_token_ids),
            "max_tokens": self.max_tokens,
        }

    @classmethod
    def from_json(cls, data: dict) -> TraceRequest:
        return cls(
            index=int(data["index"]),
            arrival_s=float(data["arrival_s"]),
            adapter=str(data["adapter"]),
            prompt_token_ids=tuple(int(t) for t in data["prompt_token_ids"]),
            max_tokens=int(data["max_tokens"]),
        )


@dataclass(frozen=True)
class Trace:
    config: TraceConfig
    requests: tuple[TraceRequest, ...] = field(default_factory=tuple)

    @property
    def total_output_tokens(self) -> int:
        return sum(r.max_tokens for r in self.requests)

    @property
    def adapters_used(self) -> list[str]:
        """Distinct adapter names in order of first use."""
        return list(dict.fromkeys(r.adapter for r in self.requests if r.adapter))


def popularity(num_adapters: int, alpha: float) -> np.ndarray:
    """(num_adapters,) probabilities of each adapter rank: p[k-1] proportional to k ** -alpha."""
    ranks = np.arange(1, num_adapters + 1, dtype=np.float64)
    weights = ranks**-alpha
    return weights / weights.sum()


def arrival_times_s(num_requests: int, rate_per_s: float, cv: float, rng: np.random.Generator) -> np.ndarray:
    """(num_requests,) non-decreasing arrival times starting at 0, Gamma gaps of mean 1/rate and CV `cv`."""
    if num_requests == 0:
        return np.zeros(0)
    if math.isinf(rate_per_s):
        return np.zeros(num_requests)
    mean_gap_s = 1.0 / rate_per_s
    if cv == 0:
        gaps_s = np.full(num_requests - 1, mean_gap_s)
    else:
        shape = 1.0 / (cv * cv)
        gaps_s = rng.gamma(shape, mean_gap_s / shape, size=num_requests - 1)
    return np.concatenate([[0.0], np.cumsum(gaps_s)])


def adapter_ids(
    num_requests: int, num_adapters: int, alpha: float, cover_all: bool, rng: np.random.Generator
) -> np.ndarray:
    """(num_requests,) adapter indices drawn by popularity (-1 = base model when num_adapters is 0); with
    `cover_all`, each adapter once and the rest of the requests by popularity, in shuffled order."""
    if num_adapters == 0:
        return np.full(num_requests, -1)
    p = popularity(num_adapters, alpha)
    if not cover_all:
        return rng.choice(num_adapters, size=num_requests, p=p)
    rest = rng.choice(num_adapters, size=num_requests - num_adapters, p=p)
    return rng.permutation(np.concatenate([np.arange(num_adapters), rest]))


def generate_trace(config: TraceConfig) -> Trace:
    """The trace `config` describes; the same config (seed included) always gives the same trace.

    Arrivals, adapters, prompt lengths, output lengths and prompts come from separate random streams of
    the seed, so two traces that differ only in their adapters (or only in their rate) share every length
    and prompt, and a longer trace of the same seed starts with the shorter one's lengths and prompts: a
    comparison across numbers of adapters changes nothing else."""
    arrival_rng, adapter_rng, prompt_len_rng, output_len_rng, prompt_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(config.seed).spawn(5)
    )
    arrivals_s = arrival_times_s(config.num_requests, config.rate_per_s, config.cv, arrival_rng)
    ids = adapter_ids(
        config.num_requests, config.num_adapters, config.alpha, config.cover_all_adapters, adapter_rng
    )
    prompt_lens = prompt_len_rng.integers(
        config.prompt_len_range[0], config.prompt_len_range[1] + 1, size=config.num_requests
    )
    output_lens = output_len_rng.integers(
        config.output_len_range[0], config.output_len_range[1] + 1, size=config.num_requests
    )
    requests = []
    for i in range(config.num_requests):
        prompt = prompt_rng.integers(FIRST_PROMPT_TOKEN_ID, config.vocab_size, size=int(prompt_lens[i]))
        adapter_id = int(ids[i])
        requests.append(
            TraceRequest(
                index=i,
                arrival_s=float(arrivals_s[i]),
                adapter=adapter_name(adapter_id, config.adapter_prefix) if adapter_id >= 0 else "",
                prompt_token_ids=tuple(int(t) for t in prompt),
                max_tokens=int(output_lens[i]),
            )
        )
    return Trace(config=config, requests=tuple(requests))


def write_trace(trace: Trace, path: Path) -> None:
    """JSONL: a header line {"trace": config} and then one request per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        f.write(json.dumps({"trace": trace.config.to_json()}) + "\n")
        for request in trace.requests:
            f.write(json.dumps(request.to_json()) + "\n")


def read_trace(path: Path) -> Trace:
    lines = _nonempty_lines(path.read_text().splitlines())
    header = json.loads(next(lines))
    if "trace" not in header:
        raise ValueError(f'{path}: the first line must be the trace header {{"trace": ...}}')
    config = TraceConfig.from_json(header["trace"])
    return Trace(config=config, requests=tuple(TraceRequest.from_json(json.loads(line)) for line in lines))


def _nonempty_lines(lines: Iterable[str]) -> Iterable[str]:
    return (line for line in lines if line.strip())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--num-adapters", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--rate", type=float, default=math.inf, help="requests per second; inf = offline")
    parser.add_argument("--cv", type=float, default=1.0)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(16, 64), metavar=("MIN", "MAX"))
    parser.add_argument("--output-len", type=int, nargs=2, default=(16, 32), metavar=("MIN", "MAX"))
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    config = TraceConfig(
        num_requests=args.num_requests,
        num_adapters=args.num_adapters,
        alpha=args.alpha,
        rate_per_s=args.rate,
        cv=args.cv,
        prompt_len_range=tuple(args.prompt_len),
        output_len_range=tuple(args.output_len),
        vocab_size=args.vocab_size,
        seed=args.seed,
    )
    trace = generate_trace(config)
    write_trace(trace, args.out)
    print(f"wrote {len(trace.requests)} requests over {len(trace.adapters_used)} adapters to {args.out}")


if __name__ == "__main__":
    main()
