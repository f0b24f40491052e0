"""Scenario 1's trace on the engine alone, step by step: how full the running set is, and why not.

`benchmarks.run`'s scenario 1 sends its whole trace at t = 0 (256 requests over 100 adapters, power-law
popularity, 16-64 generated tokens each). This replays that same trace on an `LLMEngine` with the
worker's settings (32 adapter slots, 128 running sequences, 1 GiB host tier; `--slots` to change the
first), stepped on a thread of its own as the worker steps it, and records for every step the sequences
running and waiting, the adapters held in slots, the tokens computed and the step's time. Warm-up as in
scenario 1: one 1-token request per adapter of the trace first (every adapter in host memory), then the
trace once untimed; the second pass is the one reported.

Each step falls in one of four phases, and the report gives each phase's share of the wall time, its
mean running set and its tokens/s:
- full: `max_num_seqs` sequences run;
- slot-bound: fewer run while requests wait, because every slot is held by an adapter of a running
  sequence and the waiting requests' adapters are not in a slot;
- tail: nothing waits; the running set drains as the longest requests finish.
- admitting: fewer run while requests wait with a slot free or evictable: the step's token budget
  (`max_num_batched_tokens`) admits no more prompts this step, or an adapter's copy is in flight.

`--parts` adds one more pass with `benchmarks.profile_step`'s timers around the parts of each step (base
linears, LoRA, attention, sampling, scheduling, ...), so that the trace's own time is placed, prefills
included (profile_step's steady state is decode only); it is not one of the timed passes.

    python -m benchmarks.s1_timeline [--slots 32] [--passes 2] [--parts] [--out benchmarks/results/s1_timeline.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

from benchmarks import fixtures
from benchmarks.run import _trace
from benchmarks.run_config import BenchConfig
from benchmarks.serving_overhead import (
    OverheadConfig,
    add_requests,
    engine_config,
    on_engine_thread,
    warm_requests,
)
from benchmarks.trace import Trace, adapter_name

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "s1_timeline.json"
PHASES = ("full", "slot-bound", "admitting", "tail")


def scenario1_trace(cfg: BenchConfig) -> Trace:
    """The trace `benchmarks.run` sends in scenario 1."""
    return _trace(cfg, num_requests=cfg.s1_requests, num_adapters=cfg.s1_adapters, seed=cfg.seed + 1)


def phase_of(running: int, waiting: int, max_num_seqs: int, free_slots: int) -> str:
    if running >= max_num_seqs:
        return "full"
    if waiting == 0:
        return "tail"
    return "slot-bound" if free_slots == 0 else "admitting"


def summarize(steps: list[dict], max_num_seqs: int) -> dict:
    """Per phase: seconds, share of the wall time, mean running set (time-weighted), tokens and tokens/s."""
    total_s = sum(s["seconds"] for s in steps)
    phases = {}
    for phase in PHASES:
        chosen = [s for s in steps if s["phase"] == phase]
        seconds = sum(s["seconds"] for s in chosen)
        tokens = sum(s["tokens"] for s in chosen)
        phases[phase] = {
            "steps": len(chosen),
            "seconds": seconds,
            "share": seconds / total_s if total_s else 0.0,
            "mean_running": sum(s["running"] * s["seconds"] for s in chosen) / seconds if seconds else 0.0,
            "tokens": tokens,
            "tokens_per_s": tokens / seconds if seconds else 0.0,
        }
    return {
        "seconds": total_s,
        "tokens": sum(s["tokens"] for s in steps),
        "mean_running": sum(s["running"] * s["seconds"] for s in steps) / total_s if total_s else 0.0,
        "max_num_seqs": max_num_seqs,
        "phases": phases,
    }


def free_or_evictable_slots(cache) -> int:
    """Slots a waiting request's adapter could take now: free ones, and those of adapters no sequence
    holds (evicted on demand)."""
    unheld = sum(
        1 for k in cache.known_keys() if cache.reserved_slot(k) is not None and cache.refcount(k) == 0
    )
    return cache.num_free_slots + unheld


def replay(engine, trace: Trace, refs: dict) -> list[dict]:
    """Adds every request at once, steps until done; one record per step (state after scheduling)."""
    add_requests(engine, trace.requests, refs)
    scheduler, cache = engine.scheduler, engine.adapter_cache
    max_num_seqs = scheduler.limits.max_num_seqs
    steps = []
    while engine.has_unfinished():
        started = time.perf_counter()
        outputs = engine.step()
        seconds = time.perf_counter() - started
        for out in outputs:
            if out.error is not None:
                raise RuntimeError(f"request {out.request_id} failed: {out.error}")
        # The running set the step ran (finished sequences have left it by now: count them back).
        finished = sum(1 for out in outputs if out.finished)
        running = len(scheduler.running) + finished
        waiting = len(scheduler.waiting)
        free_slots = free_or_evictable_slots(cache)
        steps.append(
            {
                "seconds": seconds,
                "running": running,
                "waiting": waiting,
                "tokens": sum(len(out.new_token_ids) for out in outputs),
                "free_slots": free_slots,
                "phase": phase_of(running, waiting, max_num_seqs, free_slots),
            }
        )
    return steps


def replay_by_part(engine, trace: Trace, refs: dict) -> dict:
    """One more pass with profile_step's part timers: ms per part over the pass, and the prompt and output
    tokens it computed."""
    from benchmarks.profile_step import PartTimer, breakdown, instrument

    timer = PartTimer()
    remove = instrument(engine, timer)
    try:
        started = time.perf_counter()
        steps = replay(engine, trace, refs)
        total_s = time.perf_counter() - started
    finally:
        remove()
    shares = breakdown(timer.seconds, total_s)
    return {
        "seconds": total_s,
        "steps": len(steps),
        "output_tokens": sum(step["tokens"] for step in steps),
        "prompt_tokens": sum(len(request.prompt_token_ids) for request in trace.requests),
        "parts_ms": {part: share * total_s * 1e3 for part, share in shares.items()},
        "parts_fraction": shares,
    }


def format_parts(parts: dict) -> str:
    lines = [
        f"by part (one more pass, timers on: {parts['seconds']:.2f} s, {parts['steps']} steps, "
        f"{parts['prompt_tokens']} prompt and {parts['output_tokens']} output tokens):",
        "| part | s | share |",
        "|---|---|---|",
    ]
    for part, ms in parts["parts_ms"].items():
        lines.append(f"| {part} | {ms / 1e3:.2f} | {parts['parts_fraction'][part]:.1%} |")
    return "\n".join(lines)


def format_report(summary: dict, slots: int) -> str:
    lines = [
        f"slots {slots}, max_num_seqs {summary['max_num_seqs']}: {summary['tokens']} tokens in "
        f"{summary['seconds']:.2f} s = {summary['tokens'] / summary['seconds']:.1f} tokens/s, mean running "
        f"set {summary['mean_running']:.1f}",
        "| phase | steps | seconds | share of wall time | mean running | tokens | tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for phase, p in summary["phases"].items():
        lines.append(
            f"| {phase} | {p['steps']} | {p['seconds']:.2f} | {p['share']:.1%} | {p['mean_running']:.1f} | "
            f"{p['tokens']} | {p['tokens_per_s']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, default=OverheadConfig.num_adapter_slots, help="adapter slots")
    parser.add_argument("--passes", type=int, default=2, help="timed passes after the untimed one")
    parser.add_argument("--parts", action="store_true", help="one more pass, timed by part")
    parser.add_argument("--out", type=Path, default=RESULTS_PATH)
    args = parser.parse_args(argv)
    if args.slots < 1 or args.passes < 1:
        parser.error("--slots >= 1 and --passes >= 1")
    from data_plane.engine.llm_engine import LLMEngine
    from data_plane.engine.request import AdapterRef
    from openlora.artifact import digest_dir

    bench = BenchConfig()
    trace = scenario1_trace(bench)
    cfg = replace(OverheadConfig(), num_adapter_slots=args.slots)
    shape = fixtures.LLAMA_50M
    model_dir = fixtures.ensure_model(shape)
    dirs = fixtures.ensure_adapters(bench.s1_adapters, shape, fixtures.AdapterSpec())
    names = trace.adapters_used
    paths = {adapter_name(i): d for i, d in enumerate(dirs)}
    refs = {name: AdapterRef(key=digest_dir(paths[name]), path=paths[name]) for name in names}
    engine = LLMEngine(engine_config(cfg, model_dir))
    load_before = os.getloadavg()[0]
    try:
        on_engine_thread(replay, engine, Trace(trace.config, tuple(warm_requests(names))), refs)
        on_engine_thread(
            replay, engine, trace, refs
        )  # untimed, as scenario 1's warm-up runs part of the trace
        passes = [on_engine_thread(replay, engine, trace, refs) for _ in range(args.passes)]
        parts = on_engine_thread(replay_by_part, engine, trace, refs) if args.parts else None
    finally:
        engine.shutdown()
    summaries = [summarize(steps, cfg.max_num_seqs) for steps in passes]
    best = min(range(len(passes)), key=lambda i: summaries[i]["seconds"])
    print(
        f"scenario 1 trace: {len(trace.requests)} requests over {len(names)} adapters, "
        f"{trace.total_output_tokens} tokens; load average {load_before:.2f} before"
    )
    for i, summary in enumerate(summaries):
        print(f"pass {i + 1}{' (best)' if i == best else ''}: " + format_report(summary, args.slots))
    result = {
        "benchmark": "s1_timeline",
        "command": "python -m benchmarks.s1_timeline"
        + (f" --slots {args.slots}" if args.slots != 32 else ""),
        "slots": args.slots,
        "load_average_before": load_before,
        "passes": summaries,
        "best_pass": best,
        "steps": passes[best],
    }
    if parts is not None:
        print(format_parts(parts))
        result["parts"] = parts
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
