"""What each linear of the benchmark model costs at decode batch sizes, against the machine's best GEMM.

The engine's roofline share (`engine_bench`) divides the model's FLOPs by the fp32 GEMM rate of a 2048
square. A decode step's linears are far from square: `rows` tokens by the hidden size against each weight.
This prints, per linear (fused q/k/v, o, fused gate/up, down, lm_head) and per row count, the median time
and FLOP rate of `F.linear` (torch's BLAS: what transformers calls, and the engine under
`OPENLORA_KERNELS=reference`), of oneDNN's inner product (`data_plane.model.dense.onednn_linear`: the
engine's float32 CPU linears by default) and of the same product computed the other way round (`W @ x.T`,
the output transposed), all calls interleaved so that load falls on every candidate alike; and the square
GEMM's rate through torch's BLAS and through oneDNN.

    python -m benchmarks.linear_shapes --out benchmarks/results/linear_shapes.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from benchmarks.fixtures import LLAMA_50M, SHAPES
from data_plane.model.dense import onednn_linear

CANDIDATES = ("F.linear", "oneDNN", "W @ x.T")


def _linears(shape) -> dict[str, tuple[int, int]]:
    """name -> (out_features, in_features) of each linear a decode step runs, fused as the engine loads them."""
    head_dim = shape.hidden_size // shape.num_attention_heads
    kv = shape.num_key_value_heads * head_dim
    return {
        "qkv (fused)": (shape.hidden_size + 2 * kv, shape.hidden_size),
        "o": (shape.hidden_size, shape.hidden_size),
        "gate_up (fused)": (2 * shape.intermediate_size, shape.hidden_size),
        "down": (shape.hidden_size, shape.intermediate_size),
        "lm_head": (shape.vocab_size, shape.hidden_size),
    }


def _time(candidates: dict, repeats: int) -> dict[str, float]:
    for fn in candidates.values():  # warm-up
        fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            started = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) * 1e3 for name, values in samples.items()}


def measure(shape, rows_list: list[int], repeats: int, square: int) -> dict:
    torch.manual_seed(0)
    results = []
    for name, (out_features, in_features) in _linears(shape).items():
        weight = torch.randn(out_features, in_features)
        for rows in rows_list:
            x = torch.randn(rows, in_features)
            count = max(5, repeats // 8) if out_features * in_features > 8_000_000 else repeats
            ms = _time(
                {
                    "F.linear": lambda x=x, w=weight: F.linear(x, w),
                    "oneDNN": lambda x=x, w=weight: onednn_linear(x, w),
                    "W @ x.T": lambda x=x, w=weight: (w @ x.t()).t(),
                },
                count,
            )
            flops = 2 * rows * in_features * out_features
            results.append(
                {
                    "linear": name,
                    "rows": rows,
                    "ms": {k: round(v, 3) for k, v in ms.items()},
                    "gflops": {k: round(flops / (v / 1e3) / 1e9, 1) for k, v in ms.items()},
                }
            )
    a = torch.randn(square, square)
    b = torch.randn(square, square)
    square_ms = _time({"torch": lambda: a @ b, "oneDNN": lambda: onednn_linear(a, b)}, 5)
    return {
        "model": shape.name,
        "threads": torch.get_num_threads(),
        "square_size": square,
        "square_gflops": {k: round(2 * square**3 / (v / 1e3) / 1e9, 1) for k, v in square_ms.items()},
        "linears": results,
    }


def _table(report: dict) -> str:
    square = ", ".join(f"{k} {v}" for k, v in report["square_gflops"].items())
    lines = [
        f"fp32 GEMM {report['square_size']} square, GFLOP/s: {square} ({report['threads']} threads)",
        "| linear | rows | " + " | ".join(f"{k} ms (GFLOP/s)" for k in CANDIDATES) + " |",
        "|---|---|" + "---|" * len(CANDIDATES),
    ]
    for r in report["linears"]:
        cells = [f"{r['ms'][k]:.3f} ({r['gflops'][k]:.1f})" for k in CANDIDATES]
        lines.append(f"| {r['linear']} | {r['rows']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=LLAMA_50M.name, choices=sorted(SHAPES))
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 91, 128])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--square", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = measure(SHAPES[args.model], args.rows, args.repeats, args.square)
    report["load_average_1m"] = os.getloadavg()[0]
    print(_table(report))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
