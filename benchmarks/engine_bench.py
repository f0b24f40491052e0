"""Engine decode throughput on the CPU: many adapters against none, and against the machine's roofline.

The model and adapters come from benchmarks.fixtures: the ~52M-parameter Llama of the issues (hidden 512,
6 layers, vocab 32000, fp32) and PEFT adapters on all seven projections (float16 files, which the engine
keeps in float16 slots on the native kernels and widens as it reads them: the values, and so the outputs,
of reading them as float32). Two parts.

Adapters: three engines live in this one process on the same weights and their steps are interleaved one
by one (base, best, skewed, base, ...), so all three see the same machine load:
- "base": 32 requests on the base model;
- "best": 32 requests, request i always on adapter i: 32 distinct rank-16 adapters in exactly 32 slots;
- "skewed": 32 requests whose adapters are drawn from a power-law popularity (alpha 1) over 100 adapters
  of mixed ranks (8, 16 and 64 in turn down the popularity order), in 32 slots (max_lora_rank 64): popular
  adapters repeat within a step, and tail adapters are copied into a slot from host memory while the
  other requests decode (all 100 are read into the host tier before the run). The copy runs on the
  engine's loader thread; the step that starts it waits for it and counts it in its own time, so that it
  never lands in another engine's timed step.
Every request has a 32-token prompt and decodes `decode_tokens`; the first 32 requests start in four
waves of 8 (decoding 1/4, 2/4, 3/4 and all of that), so that from then on 8 requests finish and are
replaced every `decode_tokens` / 4 steps while the other 24 decode, as in serving. A step is timed with
perf_counter and counts when all 32 requests decode one token each; steps with a prefill, or with a
request waiting for its adapter, run but do not count (their number is reported, and the throughput
over all steps, which includes them, is reported beside). All engines are warmed up, then restarted
together. Judged: the ratio of median step times against base (targets: best >= 0.9, skewed >= 0.8).
Before and after the run the machine's read bandwidth is measured (a float32 sum over 512 MiB) and the best
case's bound by memory reported beside it, at the faster reading: a step that must read its distinct
adapters' factors once (in the element type their slots hold) cannot beat base / (base + factor bytes /
bandwidth), whatever its kernels do.

Roofline: the machine's sustained fp32 GEMM FLOP/s is measured first (benchmarks.roofline: the model's
linears at 128 rows, and a large square), then one engine runs alone with 128 requests on the base model,
started together so that decode steps hold all 128. Reported: tokens/s from the median steady step and
its share of the roofline, tokens/s x 2 x (linear parameters per token, lm_head included) / FLOP/s,
attention left out (target >= 35%); the share with attention's FLOPs added is reported beside it.

    python -m benchmarks.engine_bench [--steps 500] [--warmup-steps 8] [--decode-tokens 128]
        [--roofline-steps 100] [--parts adapters roofline] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import torch

from benchmarks import roofline
from benchmarks.fixtures import (
    FIXTURES_DIR,
    LLAMA_1B,
    LLAMA_50M,
    AdapterSpec,
    ModelShape,
    ensure_adapters,
    ensure_model,
)
from benchmarks.steady_driver import (
    NUM_REQUESTS,
    NUM_SLOTS,
    PROMPT_TOKENS,
    SkewedDriver,
    SteadyDriver,
    adapter_refs,
    make_engine,
    popularity_draws,
    prefetch_to_host,
    run_interleaved,
)
from openlora.base_model import BaseModelSpec

RANK = 16  # the best case's adapters
# Llama-2-7B's linear shapes, for the arithmetic ceilings only (no weights are written for it)
LLAMA_7B_SHAPES = ModelShape("llama-2-7b (shapes only)", 4096, 32, 11008, 32, 32, 32000)
SKEWED_ADAPTERS = 100
SKEWED_RANKS = (8, 16, 64)
SKEWED_ALPHA = 1.0
ROOFLINE_REQUESTS = 128
WAVES = 4  # the adapter cases' requests finish in this many waves per decode length
TARGETS = {"best": 0.9, "skewed": 0.8}
READ_BYTES = 512 * 2**20  # the read-bandwidth sum's buffer: many times any L3 here
ROOFLINE_TARGET = 0.35
RESULTS_DIR = Path(__file__).parent / "results"
QUICK = {
    "steps": 20,
    "warmup_steps": 2,
    "decode_tokens": 32,
    "roofline_steps": 5,
    "gemm_seconds": 0.1,
    "square_size": 512,
}


# -- statistics ------------------------------------------------------------------------------------------


def percentile(values: list[float], fraction: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); fraction in [0, 1]."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def step_stats(step_times_s: list[float], tokens_per_step: int) -> dict:
    """Median and 10th-percentile step time of one engine, and tokens/s from each."""
    median_s = percentile(step_times_s, 0.5)
    p10_s = percentile(step_times_s, 0.1)
    return {
        "steps": len(step_times_s),
        "median_step_ms": median_s * 1e3,
        "p10_step_ms": p10_s * 1e3,
        "tokens_per_s_median": tokens_per_step / median_s,
        "tokens_per_s_p10": tokens_per_step / p10_s,
        # the old whole-run figure: all counted tokens over all counted time
        "tokens_per_s_whole_run": tokens_per_step * len(step_times_s) / sum(step_times_s),
    }


def compare(base_step_times_s: list[float], multi_step_times_s: list[float], tokens_per_step: int) -> dict:
    """Per-engine stats and multi/base throughput ratios (= base step time / multi step time)."""
    base = step_stats(base_step_times_s, tokens_per_step)
    multi = step_stats(multi_step_times_s, tokens_per_step)
    return {
        "base": base,
        "multi": multi,
        "ratio_median": base["median_step_ms"] / multi["median_step_ms"],
        "ratio_p10": base["p10_step_ms"] / multi["p10_step_ms"],
        "ratio_whole_run": multi["tokens_per_s_whole_run"] / base["tokens_per_s_whole_run"],
        # each base step against the multi step right after it: cancels load that drifts slowly
        "ratio_median_of_pairs": percentile(
            [b / m for b, m in zip(base_step_times_s, multi_step_times_s, strict=False)], 0.5
        ),
    }


# -- workload --------------------------------------------------------------------------------------------


def skewed_adapter_dirs(
    num_adapters: int, ranks: tuple[int, ...], shape: ModelShape = LLAMA_50M, root: Path = FIXTURES_DIR
) -> list[tuple[Path, int]]:
    """(directory, rank) of adapter j of the skewed case, j = 0 the most popular: its rank is
    ranks[j % len(ranks)], so the head and the tail both mix ranks; it is fixture number j // len(ranks)
    of that rank."""
    n = len(ranks)
    per_rank = {
        rank: ensure_adapters(len(range(k, num_adapters, n)), shape, AdapterSpec(rank=rank), root)
        for k, rank in enumerate(ranks)
    }
    return [(per_rank[ranks[j % n]][j // n], ranks[j % n]) for j in range(num_adapters)]


# -- the two parts ---------------------------------------------------------------------------------------


def run_adapters(
    model_dir: Path,
    best_dirs: list[Path],
    skewed: list[tuple[Path, int]],
    steps: int,
    warmup_steps: int,
    decode_tokens: int,
    num_requests: int = NUM_REQUESTS,
    num_slots: int = NUM_SLOTS,
    alpha: float = SKEWED_ALPHA,
    seed: int = 0,
    read_bytes: int = READ_BYTES,
) -> dict:
    """Interleaved base / best / skewed run (see the module docstring); `best_dirs` one adapter per
    request, `skewed` (directory, rank) in popularity order. The machine's read bandwidth is measured before
    and after it (a sum over `read_bytes`) for the best case's streaming bound."""
    best_refs = adapter_refs(best_dirs)
    skewed_refs = adapter_refs([d for d, _ in skewed])
    skewed_ranks = [rank for _, rank in skewed]
    best_rank = max(_rank_of(d) for d in best_dirs)
    draws = popularity_draws(len(skewed_refs), alpha, count=100_000, seed=seed)
    drivers: dict[str, SteadyDriver] = {}
    try:
        base_engine = make_engine(model_dir, num_requests, decode_tokens, best_rank, num_slots)
        drivers["base"] = SteadyDriver("base", base_engine, None, decode_tokens, num_requests, waves=WAVES)
        best_engine = make_engine(model_dir, num_requests, decode_tokens, best_rank, num_slots)
        drivers["best"] = SteadyDriver(
            "best", best_engine, best_refs, decode_tokens, num_requests, waves=WAVES, settle_loads=True
        )
        skewed_engine = make_engine(model_dir, num_requests, decode_tokens, max(skewed_ranks), num_slots)
        on_host = prefetch_to_host(skewed_engine, skewed_refs)
        drivers["skewed"] = SkewedDriver(
            "skewed",
            skewed_engine,
            skewed_refs,
            decode_tokens,
            num_requests,
            waves=WAVES,
            settle_loads=True,
            draws=draws,
        )
        spec = base_engine.spec
        bandwidth_before = roofline.measure_read_bandwidth(read_bytes, min_seconds=1.0)
        started = time.perf_counter()
        times_s, unsteady = run_interleaved(drivers, steps, warmup_steps)
        run_s = time.perf_counter() - started
        requested = drivers["skewed"].drawn_since_start()
        loads = {tag: d.loads_since_start() for tag, d in drivers.items()}
        all_steps = {tag: d.tokens_since_start / d.seconds_since_start for tag, d in drivers.items()}
        distinct = {tag: d.distinct_adapters for tag, d in drivers.items()}
        # the element type the best case's slots hold its adapters in (float16 files: float16 slots on
        # the native kernels, float32 on the torch reference)
        best_formats = {
            best_engine.runner.slot_formats[best_engine.adapter_cache.slot_of(ref.key)] for ref in best_refs
        }
    finally:
        for driver in drivers.values():
            driver.engine.shutdown()
    cases = {}
    for tag in ("best", "skewed"):
        stats = compare(times_s["base"], times_s[tag], num_requests)
        cases[tag] = {
            "stats": stats["multi"],
            "ratio_median": stats["ratio_median"],
            "ratio_p10": stats["ratio_p10"],
            "ratio_median_of_pairs": stats["ratio_median_of_pairs"],
            "ratio_whole_run": stats["ratio_whole_run"],
            # every step of the timed phase, prefills and waits for adapters included
            "tokens_per_s_all_steps": all_steps[tag],
            "ratio_all_steps": all_steps[tag] / all_steps["base"],
            "target_ratio": TARGETS[tag],
            "distinct_adapters_per_step": _summary(distinct[tag]),
            "adapter_loads_while_timed": loads[tag],
        }
    cases["best"]["adapters"] = {
        "count": len(best_refs),
        "ranks": dict(Counter(_rank_of(d) for d in best_dirs)),
    }
    (best_format,) = best_formats
    cases["best"]["streaming_bound"] = streaming_bound(
        spec,
        best_rank,
        cases["best"]["distinct_adapters_per_step"]["mean"],
        times_s["base"],
        read_bytes,
        earlier_readings=[bandwidth_before],
        slot_dtype=best_format,
    )
    cases["skewed"]["adapters"] = {
        "count": len(skewed_refs),
        "ranks": {str(r): n for r, n in sorted(Counter(skewed_ranks).items())},
        "popularity_alpha": alpha,
        "on_host_before_the_run": on_host,
        # the requests added since the timed phase's restart (some are still running at its end)
        "requests_while_timed": len(requested),
        "distinct_adapters_requested_while_timed": len(set(requested)),
        "requests_by_rank_while_timed": {
            str(r): n for r, n in sorted(Counter(skewed_ranks[j] for j in requested).items())
        },
    }
    return {
        "requests": num_requests,
        "slots": num_slots,
        "prompt_tokens": PROMPT_TOKENS,
        "decode_tokens_per_request": decode_tokens,
        "base": {**step_stats(times_s["base"], num_requests), "tokens_per_s_all_steps": all_steps["base"]},
        "cases": cases,
        "unsteady_steps_skipped": unsteady,
        "interleaved_run_s": run_s,
        "step_ms": {tag: [round(t * 1e3, 3) for t in ts] for tag, ts in times_s.items()},
    }


def streaming_bound(
    spec: BaseModelSpec,
    rank: int,
    distinct_adapters: float,
    base_step_times_s: list[float],
    read_bytes: int,
    earlier_readings: Sequence[float] = (),
    slot_dtype: torch.dtype = torch.float32,
) -> dict:
    """What reading the best case's factors costs at this machine's read bandwidth: a step of
    `distinct_adapters` adapters of `rank` reads each one's A and B factors once, in the element type its
    slots hold them in (`slot_dtype`: float16 for the fixtures' float16 files on the native kernels),
    whatever else it does, so its ratio against the base step cannot exceed
    `roofline.streaming_bound_ratio`. The bandwidth is read now and taken with `earlier_readings` (the one
    before the run): the fastest of them, since the machine's memory rate moves between readings and a
    bound must not be lowered by a slow one."""
    readings = [*earlier_readings, roofline.measure_read_bandwidth(read_bytes, min_seconds=1.0)]
    bytes_per_s = max(readings)
    params = roofline.lora_params_per_adapter(roofline.model_linear_shapes(spec), rank) * distinct_adapters
    element_bytes = slot_dtype.itemsize
    base_s = percentile(base_step_times_s, 0.5)
    return {
        "read_bytes_per_s": bytes_per_s,
        "read_bytes_per_s_readings": readings,
        "read_buffer_bytes": read_bytes,
        "slot_dtype": str(slot_dtype).removeprefix("torch."),
        "factor_bytes_per_step": params * element_bytes,
        "factor_read_ms": params * element_bytes / bytes_per_s * 1e3,
        "ratio": roofline.streaming_bound_ratio(base_s, params * element_bytes, bytes_per_s),
    }


def run_roofline(
    model_dir: Path,
    steps: int,
    warmup_steps: int,
    decode_tokens: int,
    gemm_seconds: float,
    square_size: int,
    num_requests: int = ROOFLINE_REQUESTS,
) -> dict:
    """GEMM FLOP/s first, then the base model alone at `num_requests` decoding sequences."""
    engine = make_engine(model_dir, num_requests, decode_tokens, max_lora_rank=RANK, num_slots=1)
    try:
        spec = engine.spec
        gemm = roofline.measure_gemm(spec, num_requests, square_size, gemm_seconds)
        driver = SteadyDriver("roofline", engine, None, decode_tokens, num_requests)
        started = time.perf_counter()
        times_s, unsteady = run_interleaved({"roofline": driver}, steps, warmup_steps)
        run_s = time.perf_counter() - started
    finally:
        engine.shutdown()
    return roofline_figures(
        spec,
        gemm,
        times_s["roofline"],
        num_requests,
        _mean(driver.context_tokens),
        unsteady["roofline"],
        run_s,
    )


def roofline_figures(
    spec,
    gemm: dict,
    step_times_s: list[float],
    num_requests: int,
    mean_context_tokens: float,
    unsteady_steps: int = 0,
    run_s: float = 0.0,
) -> dict:
    """The engine's steady decode throughput against the measured GEMM rate (see benchmarks.roofline)."""
    stats = step_stats(step_times_s, num_requests)
    shapes = roofline.model_linear_shapes(spec)
    linear_flops = roofline.linear_flops_per_token(shapes)
    attention_flops = roofline.attention_flops_per_token(spec, mean_context_tokens)
    flops_per_s = gemm["roofline_flops_per_s"]
    tokens_per_s = stats["tokens_per_s_median"]
    return {
        "requests": num_requests,
        "gemm": gemm,
        "engine": stats,
        "unsteady_steps_skipped": unsteady_steps,
        "run_s": run_s,
        "linear_params_per_token": roofline.linear_params_per_token(shapes),
        "linear_flops_per_token": linear_flops,
        "mean_context_tokens": mean_context_tokens,
        "attention_flops_per_token": attention_flops,
        "roofline_tokens_per_s": roofline.roofline_tokens_per_s(linear_flops, flops_per_s),
        "fraction_of_roofline": roofline.roofline_fraction(tokens_per_s, linear_flops, flops_per_s),
        "fraction_of_roofline_p10": roofline.roofline_fraction(
            stats["tokens_per_s_p10"], linear_flops, flops_per_s
        ),
        "fraction_of_model_shaped_gemm": roofline.roofline_fraction(
            tokens_per_s, linear_flops, gemm["model_shaped_flops_per_s"]
        ),
        "fraction_with_attention": roofline.roofline_fraction(
            tokens_per_s, linear_flops + attention_flops, flops_per_s
        ),
        "target_fraction": ROOFLINE_TARGET,
    }


def spec_of(shape: ModelShape) -> BaseModelSpec:
    return BaseModelSpec(
        name=shape.name,
        architecture="LlamaForCausalLM",
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_layers=shape.num_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        head_dim=shape.hidden_size // shape.num_attention_heads,
        vocab_size=shape.vocab_size,
    )


def best_case_ceilings(num_adapters: int = NUM_REQUESTS, rank: int = RANK) -> dict:
    """The best case's arithmetic ceilings (`roofline.adapter_ceilings`: `num_adapters` distinct adapters of
    `rank` on all seven projections in one step) on the benchmark's model, and on larger models' shapes for
    comparison: how much of a step the same adapters' factors are depends on the model's size."""
    return {
        shape.name: roofline.adapter_ceilings(spec_of(shape), rank, num_adapters)
        for shape in (LLAMA_50M, LLAMA_1B, LLAMA_7B_SHAPES)
    }


def ceilings_table(ceilings: dict, num_adapters: int = NUM_REQUESTS, rank: int = RANK) -> str:
    lines = [
        f"| model shape | base linear params | LoRA params read per step ({num_adapters} x r{rank}) "
        "| ratio bound by reading weights | ratio bound by FLOPs |",
        "|---|---|---|---|---|",
    ]
    for name, c in ceilings.items():
        lines.append(
            f"| {name} | {c['base_linear_params'] / 1e6:.1f} M | {c['lora_params_read_per_step'] / 1e6:.1f} M "
            f"| {c['bandwidth_bound_ratio']:.3f} | {c['flop_bound_ratio']:.3f} |"
        )
    return "\n".join(lines)


def _rank_of(adapter_dir: Path) -> int:
    return int(json.loads((adapter_dir / "adapter_config.json").read_text())["r"])


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _summary(values: list[int]) -> dict:
    if not values:
        return {"mean": 0.0, "min": 0, "max": 0}
    return {"mean": _mean(values), "min": min(values), "max": max(values)}


# -- report ----------------------------------------------------------------------------------------------


def adapters_table(figures: dict) -> str:
    base, cases = figures["base"], figures["cases"]
    best, skewed = cases["best"]["adapters"], cases["skewed"]["adapters"]
    labels = {
        "best": f"best: {best['count']} distinct adapters (r{'/'.join(map(str, best['ranks']))}), request i on adapter i",
        "skewed": f"skewed: power law over {skewed['count']} adapters (r{'/'.join(skewed['ranks'])}), "
        f"{figures['slots']} slots",
    }
    lines = [
        "| case | distinct adapters per step (mean) | median step ms | p10 step ms | tok/s (median) "
        "| ratio of medians | ratio of p10s | median of pairs | tok/s, all steps | ratio, all steps "
        "| adapter loads while timed | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| no adapter | 0 | {base['median_step_ms']:.2f} | {base['p10_step_ms']:.2f} | "
        f"{base['tokens_per_s_median']:.1f} | 1 | 1 | 1 | {base['tokens_per_s_all_steps']:.1f} | 1 | | |",
    ]
    for tag, label in labels.items():
        case = cases[tag]
        s = case["stats"]
        met = "met" if case["ratio_median"] >= case["target_ratio"] else "MISSED"
        loads = ", ".join(f"{n} {kind}" for kind, n in case["adapter_loads_while_timed"].items()) or "none"
        lines.append(
            f"| {label} | {case['distinct_adapters_per_step']['mean']:.1f} | {s['median_step_ms']:.2f} | "
            f"{s['p10_step_ms']:.2f} | {s['tokens_per_s_median']:.1f} | **{case['ratio_median']:.3f}** | "
            f"{case['ratio_p10']:.3f} | {case['ratio_median_of_pairs']:.3f} | {case['tokens_per_s_all_steps']:.1f} | "
            f"{case['ratio_all_steps']:.3f} | {loads} | >= {case['target_ratio']} ({met}) |"
        )
    bound = cases["best"]["streaming_bound"]
    readings = " and ".join(f"{r / 1e9:.1f}" for r in bound["read_bytes_per_s_readings"])
    lines += [
        "",
        f"Best case bound by memory: its factors ({bound['factor_bytes_per_step'] / 1e6:.1f} MB a step, "
        f"{bound['slot_dtype']} slots) "
        f"take {bound['factor_read_ms']:.2f} ms at the faster of this machine's read-bandwidth readings before and "
        f"after the run ({readings} GB/s, a sum over {bound['read_buffer_bytes'] / 2**20:.0f} MiB): "
        f"with nothing else added to the base step the ratio is at most **{bound['ratio']:.3f}**.",
    ]
    return "\n".join(lines)


def roofline_table(figures: dict) -> str:
    gemm, engine = figures["gemm"], figures["engine"]
    met = "met" if figures["fraction_of_roofline"] >= figures["target_fraction"] else "MISSED"
    n = figures["requests"]
    rows = [
        (f"fp32 GEMM, the model's linears at {gemm['rows']} rows (each shape's faster library)", f"{gemm['model_shaped_flops_per_s'] / 1e9:.1f} GFLOP/s"),
        (f"fp32 GEMM, {gemm['square_size']} square (the faster library)", f"{gemm['square_flops_per_s'] / 1e9:.1f} GFLOP/s"),
        *((f"  through {name}: model-shaped / square", f"{lib['model_shaped_flops_per_s'] / 1e9:.1f} / {lib['square_flops_per_s'] / 1e9:.1f} GFLOP/s")
          for name, lib in gemm.get("by_library", {}).items()),
        ("roofline used (the larger)", f"{gemm['roofline_flops_per_s'] / 1e9:.1f} GFLOP/s ({gemm['roofline_source']})"),
        ("FLOPs per token, linears incl. lm_head (2 x params)", f"{figures['linear_flops_per_token'] / 1e6:.1f} M"),
        (f"attention FLOPs per token at mean context {figures['mean_context_tokens']:.0f}",
         f"{figures['attention_flops_per_token'] / 1e6:.2f} M (not in the roofline share)"),
        ("roofline throughput", f"{figures['roofline_tokens_per_s']:.0f} tokens/s"),
        (f"engine, {n} decoding sequences, median / p10 step", f"{engine['median_step_ms']:.1f} / {engine['p10_step_ms']:.1f} ms"),
        ("engine tokens/s (median step)", f"{engine['tokens_per_s_median']:.1f}"),
        ("share of roofline (linears)", f"**{figures['fraction_of_roofline']:.1%}** (target >= {figures['target_fraction']:.0%}: {met})"),
        ("share of the model-shaped GEMM rate", f"{figures['fraction_of_model_shaped_gemm']:.1%}"),
        ("share with attention's FLOPs added", f"{figures['fraction_with_attention']:.1%}"),
    ]  # fmt: skip
    return "\n".join(["| measure | value |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500, help="counted steady steps per engine")
    parser.add_argument("--warmup-steps", type=int, default=8, help="steady steps discarded per engine")
    parser.add_argument("--decode-tokens", type=int, default=128, help="max_tokens of each request")
    parser.add_argument("--roofline-steps", type=int, default=100, help="counted steps at 128 sequences")
    parser.add_argument("--gemm-seconds", type=float, default=1.0, help="sampling time per GEMM shape")
    parser.add_argument("--square-size", type=int, default=2048, help="side of the square GEMM")
    parser.add_argument(
        "--parts", nargs="+", choices=("adapters", "roofline"), default=["adapters", "roofline"]
    )
    parser.add_argument("--seed", type=int, default=0, help="of the skewed case's popularity draws")
    parser.add_argument("--quick", action="store_true", help=f"a short check that it runs: {QUICK}")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/)")
    args = parser.parse_args(argv)
    if args.quick:  # quick values, except where a flag was given explicitly
        for name, value in QUICK.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    if args.steps < 1 or args.warmup_steps < 0 or args.decode_tokens < 2 or args.roofline_steps < 1:
        parser.error("--steps >= 1, --warmup-steps >= 0, --decode-tokens >= 2, --roofline-steps >= 1")
    if args.gemm_seconds <= 0 or args.square_size < 1:
        parser.error("--gemm-seconds > 0, --square-size >= 1")
    if args.out is None:
        args.out = RESULTS_DIR / ("engine_bench-quick.json" if args.quick else "engine_bench.json")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    load_before = os.getloadavg()
    started_at = datetime.now(UTC)
    started = time.perf_counter()
    model_dir = ensure_model(LLAMA_50M)
    best_dirs = ensure_adapters(NUM_REQUESTS, LLAMA_50M, AdapterSpec(rank=RANK))
    skewed = skewed_adapter_dirs(SKEWED_ADAPTERS, SKEWED_RANKS)
    print(f"fixtures ready in {time.perf_counter() - started:.1f} s ({model_dir})")
    result = {
        "benchmark": "engine_bench",
        "command": "python -m benchmarks.engine_bench" + (" --quick" if args.quick else ""),
        "at": started_at.isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "model": f"{LLAMA_50M.name}: llama hidden 512, 6 layers, vocab 32000, fp32",
        "settings": {k: (_shown(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "load_average_before": [round(x, 2) for x in load_before],
    }
    if "roofline" in args.parts:
        result["roofline"] = run_roofline(
            model_dir,
            args.roofline_steps,
            args.warmup_steps,
            args.decode_tokens,
            args.gemm_seconds,
            args.square_size,
        )
        print(roofline_table(result["roofline"]), end="\n\n")
    if "adapters" in args.parts:
        result["adapters"] = run_adapters(
            model_dir, best_dirs, skewed, args.steps, args.warmup_steps, args.decode_tokens, seed=args.seed
        )
        print(adapters_table(result["adapters"]), end="\n\n")
    result["best_case_ceilings"] = best_case_ceilings()
    print(ceilings_table(result["best_case_ceilings"]), end="\n\n")
    load_after = os.getloadavg()
    result["load_average_after"] = [round(x, 2) for x in load_after]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min) on {os.cpu_count()} CPUs"
    )
    print(f"wrote {args.out}")
    print(json.dumps(_headline(result)))
    return result


def _headline(result: dict) -> dict:
    """The judged figures, one line of JSON."""
    headline = {}
    if "adapters" in result:
        for tag, case in result["adapters"]["cases"].items():
            headline[f"{tag}_ratio_median"] = round(case["ratio_median"], 3)
    if "roofline" in result:
        roof = result["roofline"]
        headline["roofline_fraction"] = round(roof["fraction_of_roofline"], 3)
        headline["engine_tokens_per_s_128"] = round(roof["engine"]["tokens_per_s_median"], 1)
        headline["roofline_gflops"] = round(roof["gemm"]["roofline_flops_per_s"] / 1e9, 1)
    return headline


def _shown(path: Path) -> str:
    """A path as the results file records it: relative to the repository when inside it (no machine's
    directory layout in committed results)."""
    root = Path(__file__).resolve().parent.parent
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return path.name


if __name__ == "__main__":
    main()
