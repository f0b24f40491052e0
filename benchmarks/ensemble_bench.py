"""Ensemble cost on the CPU: a batch where a quarter of the requests are K = 3 ensembles, against the same
batch of single-adapter requests.

The model and adapters are engine_bench's best case, from benchmarks.fixtures (a ~52M-parameter Llama,
fp32, 32 rank-16 adapters on all seven projections). Three engines live in this one process on the same weights: "single" keeps 32 requests
running, request i on adapter i; "ensemble" keeps the same 32 requests running, but every fourth one is an
ensemble of K adapters (i, i+1, ..., i+K-1, equal weights, combine = probs), so it runs 24 + 8 K sequences;
"rows", a control, keeps as many single-adapter requests running as the ensemble batch runs sequences
(24 + 8 K). Their steps are interleaved one by one so all see the same machine load; only steady steps
count (every request decoding one token), and finished requests are replaced. Each steady step yields one
token per request, so the throughput ratio ensemble/single is the ratio of step times. Target: the
ensemble rows cost no more than K single rows, i.e. ratio >= 1 / (1 + fraction (K - 1)) (0.67 for a
quarter of K = 3), which assumes a step's cost grows linearly with its rows; the control measures that
directly: "rows" step time / ensemble step time >= 1 means an ensemble costs no more than its K rows.

    python -m benchmarks.ensemble_bench [--steps 200] [--warmup-steps 8] [--decode-tokens 64] [--k 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from benchmarks.engine_bench import percentile, step_stats
from benchmarks.fixtures import LLAMA_50M, AdapterSpec, ensure_adapters, ensure_model
from benchmarks.steady_driver import PROMPT_TOKENS, SteadyDriver, run_interleaved
from data_plane.engine.config import EngineConfig
from data_plane.engine.llm_engine import LLMEngine
from data_plane.engine.request import AdapterRef, EngineRequest, Ensemble, EnsembleMember, SamplingOptions
from openlora.artifact import digest_dir

NUM_REQUESTS = 32
ENSEMBLE_EVERY = 4  # every fourth request is an ensemble: a quarter of the batch
RESULTS_PATH = Path(__file__).parent / "results" / "ensemble_bench.json"


def target_ratio(k: int, fraction: float) -> float:
    """The throughput ratio at which ensemble rows cost exactly K single rows."""
    return 1.0 / (1.0 + fraction * (k - 1))


@dataclass
class EnsembleDriver(SteadyDriver):
    """engine_bench's steady driver where, when `k` is set, every request i that is a multiple of
    ENSEMBLE_EVERY is an ensemble of adapters i..i+k-1 instead of a request on adapter i."""

    k: int | None = None

    def request(self, i: int, request_id: str, prompt: list[int], sampling: SamplingOptions) -> EngineRequest:
        if self.k is None or i % ENSEMBLE_EVERY:
            return super().request(i, request_id, prompt, sampling)
        n = len(self.adapters)
        members = tuple(EnsembleMember(self.adapters[(i + j) % n], 1.0) for j in range(self.k))
        return EngineRequest(request_id, prompt, sampling, ensemble=Ensemble(members, "probs"))


def make_engine(model_dir: Path, num_requests: int, k: int, max_lora_rank: int) -> LLMEngine:
    max_seqs = num_requests + (num_requests // ENSEMBLE_EVERY + 1) * (k - 1)
    return LLMEngine(
        EngineConfig(
            model_dir=model_dir,
            dtype="float32",
            num_adapter_slots=num_requests,
            max_num_seqs=max_seqs,
            max_num_batched_tokens=max(2048, max_seqs * PROMPT_TOKENS),
            kv_cache_bytes=512 << 20,
            max_lora_rank=max_lora_rank,
        )
    )


def run(
    model_dir: Path,
    adapter_dirs: list[Path],
    steps: int,
    warmup_steps: int,
    decode_tokens: int,
    k: int,
    num_requests: int = NUM_REQUESTS,
    max_lora_rank: int = 16,
) -> dict:
    """Interleaves the two engines' steps (after `warmup_steps` discarded steady steps each, both restart
    together) until each has `steps` steady steps; returns the figures."""
    adapters = [AdapterRef(digest_dir(d), d) for d in adapter_dirs]
    num_ensembles = len(range(0, num_requests, ENSEMBLE_EVERY))
    num_rows = num_requests + num_ensembles * (k - 1)
    drivers = {
        "single": EnsembleDriver(
            "single",
            make_engine(model_dir, num_requests, k, max_lora_rank),
            adapters,
            decode_tokens,
            num_requests=num_requests,
        ),
        "ensemble": EnsembleDriver(
            "ensemble",
            make_engine(model_dir, num_requests, k, max_lora_rank),
            adapters,
            decode_tokens,
            num_requests=num_requests,
            k=k,
        ),
        # A control: as many single-adapter requests as the ensemble batch runs sequences.
        "rows": EnsembleDriver(
            "rows",
            make_engine(model_dir, num_requests, k, max_lora_rank),
            adapters,
            decode_tokens,
            num_requests=num_rows,
        ),
    }
    started = time.perf_counter()
    try:
        times_s, unsteady = run_interleaved(drivers, steps, warmup_steps)
        sequences = {tag: len(d.engine.scheduler.running) for tag, d in drivers.items()}
    finally:
        for driver in drivers.values():
            driver.engine.shutdown()
    run_s = time.perf_counter() - started
    single = step_stats(times_s["single"], num_requests)
    ensemble = step_stats(times_s["ensemble"], num_requests)
    rows = step_stats(times_s["rows"], num_rows)
    fraction = num_ensembles / num_requests
    return {
        "requests": num_requests,
        "k": k,
        "ensemble_fraction": fraction,
        "sequences_running": sequences,
        "single": single,
        "rows": rows,
        "ensemble": ensemble,
        "ratio_median": single["median_step_ms"] / ensemble["median_step_ms"],
        "ratio_p10": single["p10_step_ms"] / ensemble["p10_step_ms"],
        "ratio_median_of_pairs": percentile(
            [s / e for s, e in zip(times_s["single"], times_s["ensemble"], strict=False)], 0.5
        ),
        # Step time of as many single rows as the ensemble batch runs, over the ensemble batch's.
        "rows_over_ensemble_step_median": rows["median_step_ms"] / ensemble["median_step_ms"],
        # What the target ratio would be if a step's cost followed the control's (not linear) scaling.
        "single_over_rows_step_median": single["median_step_ms"] / rows["median_step_ms"],
        "target_ratio": target_ratio(k, fraction),
        "unsteady_steps_skipped": unsteady,
        "interleaved_run_s": run_s,
        "step_ms": {tag: [round(t * 1e3, 3) for t in ts] for tag, ts in times_s.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="counted steady steps per engine")
    parser.add_argument("--warmup-steps", type=int, default=8, help="steady steps discarded per engine")
    parser.add_argument("--decode-tokens", type=int, default=64, help="max_tokens of each request")
    parser.add_argument("--k", type=int, default=3, help="members of each ensemble")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup_steps < 0 or args.decode_tokens < 2 or not 2 <= args.k <= 8:
        parser.error("--steps >= 1, --warmup-steps >= 0, --decode-tokens >= 2, 2 <= --k <= 8")
    load_before = os.getloadavg()
    started_at = datetime.now(UTC)
    started = time.perf_counter()
    model_dir = ensure_model(LLAMA_50M)
    adapter_dirs = ensure_adapters(NUM_REQUESTS, LLAMA_50M, AdapterSpec(rank=16))
    print(f"fixtures ready in {time.perf_counter() - started:.1f} s ({model_dir})")
    figures = run(model_dir, adapter_dirs, args.steps, args.warmup_steps, args.decode_tokens, args.k)
    load_after = os.getloadavg()
    result = {
        "benchmark": "ensemble_bench",
        "method": "one process, single, ensemble and rows steps interleaved; steady decode steps timed one by one",
        "at": started_at.isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "model": "llama hidden 512, 6 layers, vocab 32000, fp32; 32 rank-16 adapters on all seven projections",
        "prompt_tokens": PROMPT_TOKENS,
        "decode_tokens_per_request": args.decode_tokens,
        "warmup_steps": args.warmup_steps,
        **figures,
    }
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(json.dumps(result, indent=2))
    print(
        f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min) on {os.cpu_count()} CPUs"
    )
    k, n = figures["k"], figures["requests"]
    rows = (
        (f"{n} single-adapter requests", figures["single"], figures["sequences_running"]["single"]),
        (
            f"{n // ENSEMBLE_EVERY} of them K={k} ensembles",
            figures["ensemble"],
            figures["sequences_running"]["ensemble"],
        ),
        (
            f"control: {figures['sequences_running']['rows']} single-adapter requests",
            figures["rows"],
            figures["sequences_running"]["rows"],
        ),
    )
    print(f"{'batch':<34}{'sequences':>10}{'median ms':>11}{'p10 ms':>9}{'tok/s (median)':>16}")
    for label, s, seqs in rows:
        print(
            f"{label:<34}{seqs:>10}{s['median_step_ms']:>11.2f}{s['p10_step_ms']:>9.2f}{s['tokens_per_s_median']:>16.1f}"
        )
    print(
        f"tokens/s ratio ensemble/single: median {figures['ratio_median']:.3f} "
        f"(target >= {figures['target_ratio']:.3f}), p10 {figures['ratio_p10']:.3f}, "
        f"median of pairs {figures['ratio_median_of_pairs']:.3f}"
    )
    print(
        f"step time of the control over the ensemble batch (same sequences): "
        f"{figures['rows_over_ensemble_step_median']:.3f} (>= 1: an ensemble costs no more than its K rows); "
        f"single over control: {figures['single_over_rows_step_median']:.3f} (the ratio linear scaling would give: "
        f"{figures['target_ratio']:.3f})"
    )
    print(f"{args.steps} steps per engine in {figures['interleaved_run_s']:.1f} s; wrote {RESULTS_PATH}")


if __name__ == "__main__":
    main()
