"""Decode attention benchmark: the paged decode paths of `openlora_kernels.paged_attention` at decode shapes.

    python -m benchmarks.attention_bench                  # CPU: the torch paths and the native kernel
    python -m benchmarks.attention_bench --quick          # CPU, fewer repeats: checks the code paths run
    python -m benchmarks.attention_bench --device cuda    # CUDA: the Triton kernel against gather_sdpa

CPU shapes are one layer of the bench model (`benchmarks.fixtures.LLAMA_50M`: 8 heads of 64, float32) at
128 decoding sequences with contexts drawn uniformly from 32-120 tokens in blocks of 16, the case the
engine benchmark runs. CUDA shapes are one layer of the 1.1B GPU model (`LLAMA_1B`: 32 heads, 4 kv heads,
bfloat16) at 1 to 256 sequences, short and long contexts. Each row is the median time of one call per
path and its ratio to gather_sdpa (the padded gather + masked SDPA the model used before), measured in
the same run; every path's output is checked against gather_sdpa's first. Prints a table; --out writes
JSON. On a busy machine, also run it with --threads 1 and with OMP_WAIT_POLICY=PASSIVE: torch's threads
spin at each op's barrier while other jobs hold the cores, which favours the path with fewest ops (the
figures behind the CPU default are in openlora_kernels/paged_attention.py).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.fixtures import LLAMA_1B, LLAMA_50M, ModelShape

BLOCK_SIZE = 16
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


@dataclass(frozen=True)
class Case:
    num_seqs: int
    min_context: int
    max_context: int


@dataclass
class Row:
    path: str
    num_seqs: int
    contexts: str
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    ms: float
    vs_gather_sdpa: float
    cpu_ms: float | None  # process CPU time (None on CUDA)
    cpu_vs_gather_sdpa: float | None


CPU_CASES = (Case(128, 32, 120), Case(32, 32, 120), Case(128, 200, 500))
CUDA_CASES = (
    Case(1, 32, 120),
    Case(32, 32, 120),
    Case(128, 32, 120),
    Case(256, 32, 120),
    Case(32, 1000, 4000),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="the first case only, few repeats")
    p.add_argument("--repeats", type=int, default=30, help="timed calls per path (CPU)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    return p.parse_args(argv)


def make_inputs(case: Case, shape: ModelShape, dtype: torch.dtype, device: str, seed: int = 0):
    """Random q and a paged cache holding every sequence's blocks in shuffled block order."""
    gen = torch.Generator().manual_seed(seed)
    head_dim = shape.hidden_size // shape.num_attention_heads
    lens = torch.randint(case.min_context, case.max_context + 1, (case.num_seqs,), generator=gen)
    max_blocks = -(-case.max_context // BLOCK_SIZE)
    num_blocks = case.num_seqs * max_blocks + 1
    tables = torch.randperm(num_blocks, generator=gen)[: case.num_seqs * max_blocks].view(
        case.num_seqs, max_blocks
    )
    blocks_used = (lens + BLOCK_SIZE - 1) // BLOCK_SIZE
    tables[torch.arange(max_blocks).unsqueeze(0) >= blocks_used.unsqueeze(1)] = 0  # padded as the runner pads
    cache_shape = (num_blocks, BLOCK_SIZE, shape.num_key_value_heads, head_dim)
    q = torch.randn(case.num_seqs, shape.num_attention_heads, head_dim, generator=gen)
    k_cache, v_cache = torch.randn(cache_shape, generator=gen), torch.randn(cache_shape, generator=gen)
    to = dict(device=device, dtype=dtype)
    return (
        q.to(**to),
        k_cache.to(**to),
        v_cache.to(**to),
        tables.to(device),
        lens.to(device),
        head_dim**-0.5,
    )


def time_cpu_ms(calls: dict, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall ms and median process CPU ms per call of each path. The paths take turns within every
    repeat, so a busy machine's slow and fast moments fall on all of them alike; CPU time leaves out the
    time other processes held the cores (with one torch thread it is the path's own work)."""
    for call in calls.values():
        call()  # warm-up
    wall: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            call()
            wall[name].append((time.perf_counter() - start) * 1e3)
            cpu[name].append((time.process_time() - start_cpu) * 1e3)
    return (
        {name: statistics.median(t) for name, t in wall.items()},
        {name: statistics.median(t) for name, t in cpu.items()},
    )


def time_cuda_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def native_path(kernels, q, k_cache, v_cache, block_tables, context_lens, scale, *, max_context_len=None):
    """attention_cpu.c's kernel; its tables' checks (done once per step in the engine, for every layer) are
    timed with each call here."""
    tables = kernels.decode_tables(block_tables, context_lens)
    return kernels.paged_decode(q, k_cache, v_cache, tables, scale)


def candidates(device: str) -> dict:
    from openlora_kernels import paged_attention

    if device == "cpu":
        paths = dict(paged_attention.CPU_PATHS)
        from data_plane.model.quant.native import native_kernels

        kernels = native_kernels()
        if kernels is not None:
            paths["native"] = functools.partial(native_path, kernels)
        return paths
    from openlora_kernels.triton_ops.paged_decode import paged_decode_attention

    return {"gather_sdpa": paged_attention.gather_sdpa, "triton": paged_decode_attention}


def run(args: argparse.Namespace) -> list[Row]:
    shape, dtype = (LLAMA_50M, torch.float32) if args.device == "cpu" else (LLAMA_1B, torch.bfloat16)
    cases = CPU_CASES if args.device == "cpu" else CUDA_CASES
    if args.quick:
        cases = cases[:1]
    repeats = 3 if args.quick else args.repeats
    paths = candidates(args.device)
    rows: list[Row] = []
    for case in cases:
        inputs = make_inputs(case, shape, dtype, args.device)
        # The longest context, known on the host as the engine knows it: no validation sync in the timing.
        hint = {"max_context_len": int(inputs[4].max())}
        baseline = paths["gather_sdpa"](*inputs, **hint)
        calls = {}
        for name, fn in paths.items():
            err = (fn(*inputs, **hint).float() - baseline.float()).abs().max().item()
            if not err <= TOLERANCE[dtype]:
                raise SystemExit(f"{name} differs from gather_sdpa by {err:.3g} at {case}")
            calls[name] = functools.partial(fn, *inputs, **hint)
        if args.device == "cpu":
            timings, cpu_timings = time_cpu_ms(calls, repeats)
        else:
            timings = {name: time_cuda_ms(call) for name, call in calls.items()}
            cpu_timings = {}
        for name, ms in timings.items():
            rows.append(
                Row(
                    name, case.num_seqs, f"{case.min_context}-{case.max_context}", shape.num_attention_heads,
                    shape.num_key_value_heads, inputs[0].shape[2], str(dtype).removeprefix("torch."),
                    round(ms, 4), round(ms / timings["gather_sdpa"], 3),
                    round(cpu_timings[name], 4) if cpu_timings else None,
                    round(cpu_timings[name] / cpu_timings["gather_sdpa"], 3) if cpu_timings else None,
                )
            )  # fmt: skip
    return rows


def print_table(rows: list[Row], device: str) -> None:
    print(f"decode attention, one layer, {device}, torch threads {torch.get_num_threads()}")
    header = f"{'path':<15}{'seqs':>6}{'contexts':>11}{'heads/kv/dim':>14}{'dtype':>10}"
    header += f"{'ms':>10}{'vs gather':>11}"
    print(header + (f"{'cpu ms':>10}{'vs gather':>11}" if rows and rows[0].cpu_ms is not None else ""))
    for r in rows:
        dims = f"{r.heads}/{r.kv_heads}/{r.head_dim}"
        shape = f"{r.path:<15}{r.num_seqs:>6}{r.contexts:>11}{dims:>14}{r.dtype:>10}"
        ratios = f"{r.ms:>10.3f}{r.vs_gather_sdpa:>10.2f}x"
        if r.cpu_ms is not None:
            ratios += f"{r.cpu_ms:>10.3f}{r.cpu_vs_gather_sdpa:>10.2f}x"
        print(shape + ratios)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("attention_bench: --device cuda needs a CUDA device visible to torch")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args)
    print_table(rows, args.device)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")


if __name__ == "__main__":
    main()
