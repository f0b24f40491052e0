"""Where a decode step's time goes on a GPU: the host's work against the device's.

On a GPU a decode step is fast only if the device is kept busy; a step whose kernels sum to far less
than its wall time is bound by the host (Python, dispatch, kernel launches, synchronizations), and no
kernel work will shorten it. This benchmark builds the engines of benchmarks/quant_bench.py (the 1.1B
Llama of `benchmarks.fixtures.LLAMA_1B`, bf16; int4 and int8 bases) and, for each case, keeps `--batch`
requests decoding and measures:

- wall ms per step: the median of `--steps` steady steps without the profiler;
- device-busy ms per step: the union of the intervals in which a kernel or copy ran, under
  torch.profiler over `--profiled-steps` further steps (so overlapping streams are not counted twice);
- kernel launches per step, and the ops with the most host (self CPU) time and the kernels with the most
  device time.

    python -m benchmarks.gpu_profile [--steps 30] [--profiled-steps 10]     # CUDA (gpu_check.sh runs it)
    python -m benchmarks.gpu_profile --device cpu --small --steps 3 --profiled-steps 2   # smoke run
    python -m benchmarks.gpu_profile --device cpu --shape 370m --cases int8:1    # quant_bench's CPU model

`--cases` picks cases as ENGINE:REQUESTS (an `a` suffix: on adapters), comma-separated.

Prints a table per case; writes JSON (default benchmarks/results/gpu_profile.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks import fixtures
from benchmarks.quant_bench import LLAMA_370M, NUM_ADAPTERS, SMALL, Bench, make_bench
from benchmarks.report import format_table

RESULTS_PATH = Path(__file__).parent / "results" / "gpu_profile.json"
# (engine, requests decoding, with adapters): batch 1 is the latency case, 32 the shared-adapter case.
CASES = (("bf16", 1, False), ("bf16", 32, True), ("int4", 1, False), ("int8", 1, False))
TOP = 12
SHAPES = {"1b": fixtures.LLAMA_1B, "370m": LLAMA_370M, "small": SMALL}


def parse_cases(text: str) -> tuple[tuple[str, int, bool], ...]:
    """'bf16:1,bf16:32a' -> (("bf16", 1, False), ("bf16", 32, True))."""
    cases = []
    for item in text.split(","):
        engine, _, count = item.strip().partition(":")
        adapters = count.endswith("a")
        cases.append((engine, int(count.removesuffix("a")), adapters))
    return tuple(cases)


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (microseconds)."""
    total, end_so_far = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= end_so_far:
            continue
        total += end - max(start, end_so_far)
        end_so_far = end
    return total


def steady_steps(bench: Bench, num: int, count: int) -> list[float]:
    """Seconds of `count` steps in which all `num` requests decode one token each."""
    times: list[float] = []
    for _ in range(20 * count + 500):
        if len(times) >= count:
            return times
        elapsed_s = bench.step(num)
        if elapsed_s is not None:
            times.append(elapsed_s)
    raise RuntimeError(f"{bench.name}: not steady after {20 * count + 500} steps")


def profile_case(bench: Bench, num: int, adapters: bool, steps: int, profiled: int, device: str) -> dict:
    tag = f"p{num}{'a' if adapters else ''}"
    bench.add_requests(tag, num, max_tokens=8 + steps + profiled + 64, with_adapters=adapters)
    wall = steady_steps(bench, num, steps)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        steady_steps(bench, num, profiled)
        if device == "cuda":
            torch.cuda.synchronize()
    events = prof.events()
    device_events = [e for e in events if e.device_type == DeviceType.CUDA]
    intervals = [(e.time_range.start, e.time_range.end) for e in device_events]
    kernels = [e for e in device_events if "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
    averages = prof.key_averages()
    host_ops = sorted(averages, key=lambda a: a.self_cpu_time_total, reverse=True)[:TOP]
    device_ops: dict[str, float] = {}
    for e in kernels:
        device_ops[e.name] = device_ops.get(e.name, 0.0) + e.time_range.elapsed_us()
    for i in range(num):
        bench.engine.abort(f"{tag}-{i}")
    bench.drain()
    return {
        "engine": bench.name,
        "requests": num,
        "adapters": adapters,
        "wall_ms_per_step": statistics.median(wall) * 1000,
        "device_busy_ms_per_step": busy_us(intervals) / 1000 / profiled,
        "kernel_launches_per_step": len(kernels) / profiled,
        "host_ops": [
            {"op": a.key, "self_cpu_ms_per_step": a.self_cpu_time_total / 1000 / profiled, "calls": a.count}
            for a in host_ops
        ],
        "device_kernels": [
            {"kernel": name[:120], "ms_per_step": us / 1000 / profiled}
            for name, us in sorted(device_ops.items(), key=lambda kv: kv[1], reverse=True)[:TOP]
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=30, help="steady steps timed without the profiler")
    parser.add_argument("--profiled-steps", type=int, default=10)
    parser.add_argument("--small", action="store_true", help="a 2-layer model (a smoke run, not a figure)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None, help="the model (default 1b)")
    parser.add_argument(
        "--cases", type=parse_cases, default=CASES, help="ENGINE:REQUESTS[a],... (default: all four)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_PATH)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_profile: no CUDA device; use --device cpu --small for a smoke run", file=sys.stderr)
        return 2
    shape = SMALL if args.small else SHAPES[args.shape or "1b"]
    model_dir = fixtures.ensure_model(shape)
    adapter_dirs = fixtures.ensure_adapters(NUM_ADAPTERS, shape, fixtures.AdapterSpec(rank=16))
    benches: dict[str, Bench] = {}
    results = []
    for name, num, adapters in args.cases:
        if name not in benches:
            benches[name] = make_bench(name, args.device, model_dir, adapter_dirs)
        case = profile_case(benches[name], num, adapters, args.steps, args.profiled_steps, args.device)
        results.append(case)
        print(
            f"\n{name}, {num} request(s){' on adapters' if adapters else ''}: "
            f"wall {case['wall_ms_per_step']:.2f} ms/step, device busy {case['device_busy_ms_per_step']:.2f} ms "
            f"({case['device_busy_ms_per_step'] / case['wall_ms_per_step']:.0%}), "
            f"{case['kernel_launches_per_step']:.0f} kernel launches/step",
            flush=True,
        )
        print(
            format_table(
                ["host op", "self CPU ms/step", "calls"],
                [[h["op"][:60], f"{h['self_cpu_ms_per_step']:.3f}", h["calls"]] for h in case["host_ops"]],
            )
        )
        if case["device_kernels"]:
            print(
                format_table(
                    ["kernel", "device ms/step"],
                    [[k["kernel"][:80], f"{k['ms_per_step']:.3f}"] for k in case["device_kernels"]],
                )
            )
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu"
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks.gpu_profile", *(sys.argv[1:] if argv is None else argv)]),
        "device": device_name,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "model": {"shape": shape.name, "parameters": shape.num_parameters},
        "cases": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
