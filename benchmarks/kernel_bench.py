"""SGMV kernel benchmark: Triton shrink/expand vs a torch gather + bmm baseline, and vs copy bandwidth.

    python -m benchmarks.kernel_bench                 # CUDA, Llama-3-8B dims; appends to RESULTS.md
    python -m benchmarks.kernel_bench --dry-run       # tiny shapes, code paths only (interpreter without CUDA)

Times are medians (``triton.testing.do_bench`` on CUDA). Bandwidth is the minimum traffic of the op
(activations in and out, plus each distinct adapter's weights once) over its time, reported as a
fraction of a device-to-device copy measured in the same run. Targets (issue 4): decode shapes at 70%
or more of the copy bandwidth, and faster than gather + bmm at every shape.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

DECODE_ROWS = (1, 8, 32, 64, 128, 256)
PREFILL_SHAPES = ((512, 4), (2048, 4))  # (rows, segments of equal length, one adapter each)
HIDDEN = 4096  # Llama-3-8B
OUT_FEATURES = (4096, 14336)
RANKS = (16, 64)
BANDWIDTH_TARGET = 0.7


@dataclass(frozen=True)
class Shape:
    kind: str  # "decode" or "prefill"
    num_rows: int
    num_segments: int
    in_features: int
    out_features: int
    rank: int


@dataclass
class Row:
    op: str
    path: str
    kind: str
    num_rows: int
    num_segments: int
    in_features: int
    out_features: int
    rank: int
    triton_ms: float
    baseline_ms: float
    speedup: float
    bandwidth_gbps: float
    copy_fraction: float


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--dry-run", action="store_true", help="tiny shapes: compiled on CUDA, else in Triton's interpreter"
    )
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"), help="JSON goes here")
    p.add_argument("--results-md", type=Path, default=None, help="append the table here")
    p.add_argument("--dtype", choices=("float16", "bfloat16"), default="bfloat16")
    args = p.parse_args(argv)
    if args.results_md is None and not args.dry_run:
        args.results_md = Path("benchmarks/RESULTS.md")
    return args


def shapes_for(dry_run: bool) -> list[Shape]:
    if dry_run:
        return [Shape("decode", t, t, 64, 48, 8) for t in (1, 4)] + [Shape("prefill", 40, 2, 64, 130, 16)]
    shapes = []
    for out_features in OUT_FEATURES:
        for rank in RANKS:
            shapes += [Shape("decode", t, t, HIDDEN, out_features, rank) for t in DECODE_ROWS]
            shapes += [Shape("prefill", t, g, HIDDEN, out_features, rank) for t, g in PREFILL_SHAPES]
    return shapes


class Timer:
    """Median milliseconds of a call: do_bench on CUDA, wall clock on the CPU (dry run)."""

    def __init__(self, device, torch_mod, triton_mod):
        self.device, self.torch, self.triton = device, torch_mod, triton_mod

    def __call__(self, fn) -> float:
        if self.device.type == "cuda":
            return float(self.triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
        fn()
        samples = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)


def copy_bandwidth_gbps(torch, device, timer, num_bytes: int) -> float:
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * num_bytes / (ms * 1e-3) / 1e9  # read + write


def bench_shape(torch, ops, timer, shape: Shape, dtype, device, copy_gbps: float) -> list[Row]:
    t, g = shape.num_rows, shape.num_segments
    num_slots = max(g, 4)
    gen = torch.Generator(device="cpu").manual_seed(t * 7 + shape.out_features + shape.rank)
    seg_indptr = torch.linspace(0, t, g + 1).round().to(torch.int32).to(device)
    seg_slots = torch.randperm(num_slots, generator=gen)[:g].to(torch.int32).to(device)  # distinct adapters
    lengths = (seg_indptr[1:] - seg_indptr[:-1]).long()
    row_slots = torch.repeat_interleave(seg_slots.long(), lengths)  # (T,)
    x = torch.randn(t, shape.in_features, device=device).to(dtype)
    lora_a = (torch.randn(num_slots, shape.rank, shape.in_features, device=device) * 0.02).to(dtype)
    lora_b = (torch.randn(num_slots, shape.out_features, shape.rank, device=device) * 0.02).to(dtype)
    scale = torch.full((num_slots,), 0.5, device=device)
    y = torch.randn(t, shape.out_features, device=device).to(dtype)
    u = ops.shrink.sgmv_shrink(x, lora_a, seg_indptr, seg_slots)

    def baseline_shrink():
        return torch.bmm(lora_a[row_slots], x.unsqueeze(2)).squeeze(2)  # (T, R, H_in) gathered

    def baseline_expand():
        delta = torch.bmm(lora_b[row_slots], u.unsqueeze(2)).squeeze(2)  # (T, H_out, R) gathered
        y.add_(delta * scale[row_slots].unsqueeze(1).to(dtype))

    elem = x.element_size()
    num_adapters = g
    shrink_bytes = elem * (
        t * shape.in_features + num_adapters * shape.rank * shape.in_features + t * shape.rank
    )
    expand_bytes = elem * (
        t * shape.rank + num_adapters * shape.out_features * shape.rank + 2 * t * shape.out_features
    )
    max_rows = int(lengths.max())  # known on the host in the engine: no sync inside the timed calls
    paths = ["auto", "segmented", "bgmv", "auto-checked"] if shape.kind == "decode" and t == g else ["auto"]
    rows = []
    for op, nbytes, baseline in (
        ("shrink", shrink_bytes, baseline_shrink),
        ("expand", expand_bytes, baseline_expand),
    ):
        baseline_ms = timer(baseline)
        for path in paths:
            # "auto-checked": no max_segment_rows, so the launcher validates indices with a device sync.
            forced = None if path.startswith("auto") else path
            kw = {"path": forced, "max_segment_rows": None if path == "auto-checked" else max_rows}
            if op == "shrink":
                fn = lambda kw=kw: ops.shrink.sgmv_shrink(x, lora_a, seg_indptr, seg_slots, **kw)  # noqa: E731
            else:
                fn = lambda kw=kw: ops.expand.sgmv_expand(u, lora_b, seg_indptr, seg_slots, y, scale, **kw)  # noqa: E731
            ms = timer(fn)
            gbps = nbytes / (ms * 1e-3) / 1e9
            rows.append(
                Row(op, path, shape.kind, t, g, shape.in_features, shape.out_features, shape.rank,
                    round(ms, 5), round(baseline_ms, 5), round(baseline_ms / ms, 3), round(gbps, 1),
                    round(gbps / copy_gbps, 3))
            )  # fmt: skip
    return rows


def format_table(rows: list[Row]) -> str:
    head = "| op | path | kind | T | G | H_in | H_out | R | triton ms | gather+bmm ms | speedup | GB/s | of copy |"
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        lines.append(
            f"| {r.op} | {r.path} | {r.kind} | {r.num_rows} | {r.num_segments} | {r.in_features} | "
            f"{r.out_features} | {r.rank} | {r.triton_ms:.4f} | {r.baseline_ms:.4f} | {r.speedup:.2f} | "
            f"{r.bandwidth_gbps:.0f} | {r.copy_fraction:.0%} |"
        )
    return "\n".join(lines)


def summarize(rows: list[Row]) -> dict:
    auto = [r for r in rows if r.path == "auto"]
    decode = [r for r in auto if r.kind == "decode"]
    return {
        "decode_min_copy_fraction": min((r.copy_fraction for r in decode), default=None),
        "decode_at_bandwidth_target": all(r.copy_fraction >= BANDWIDTH_TARGET for r in decode),
        "min_speedup_vs_gather_bmm": min((r.speedup for r in auto), default=None),
        "faster_than_baseline_everywhere": all(r.speedup > 1.0 for r in auto),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    # A dry run without CUDA runs the kernels in Triton's interpreter, which must be switched on before
    # triton is first imported (Triton 3.6 defines its language functions at that import). With CUDA the
    # dry run's tiny shapes run compiled on the GPU.
    if args.dry_run and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    import triton

    from openlora_kernels.triton_ops import sgmv_expand as expand_mod
    from openlora_kernels.triton_ops import sgmv_shrink as shrink_mod

    class Ops:
        shrink, expand = shrink_mod, expand_mod

    interpreted = shrink_mod._INTERPRETED and expand_mod._INTERPRETED
    device = torch.device("cpu" if interpreted else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "kernel_bench: no CUDA device; use --dry-run to exercise the code paths on the CPU",
            file=sys.stderr,
        )
        return 2
    dtype = getattr(torch, args.dtype)
    timer = Timer(device, torch, triton)
    copy_gbps = copy_bandwidth_gbps(torch, device, timer, (1 << 20) if args.dry_run else (1 << 30))
    rows: list[Row] = []
    for shape in shapes_for(args.dry_run):
        rows += bench_shape(torch, Ops, timer, shape, dtype, device, copy_gbps)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    table = format_table(rows)
    summary = summarize(rows)
    print(f"device: {device_name}  dtype: {args.dtype}  copy bandwidth: {copy_gbps:.0f} GB/s")
    print(table)
    print(json.dumps(summary))

    stamp = dt.datetime.now(dt.UTC)
    report = {
        "date": stamp.isoformat(timespec="seconds"),
        "device": device_name,
        "dtype": args.dtype,
        "dry_run": args.dry_run,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "copy_bandwidth_gbps": round(copy_gbps, 1),
        "summary": summary,
        "rows": [asdict(r) for r in rows],
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.out_dir / f"kernel_bench{'_dry_run' if args.dry_run else ''}.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {json_path}")
    if args.results_md is not None:
        section = (
            f"\n### SGMV kernels, {stamp:%Y-%m-%d %H:%M} UTC, {device_name}, {args.dtype}"
            f"{' (dry run: tiny shapes, not performance)' if args.dry_run else ''}\n\n"
            f"Copy bandwidth measured in the same run: {copy_gbps:.0f} GB/s. "
            "`path` auto: what the public functions run given `max_segment_rows` (no device sync); "
            "segmented/bgmv: forced for comparison; auto-checked: without `max_segment_rows`, so with "
            "the index checks' device sync.\n\n"
            f"{table}\n\nSummary: `{json.dumps(summary)}`\n"
        )
        with args.results_md.open("a") as f:
            f.write(section)
        print(f"appended to {args.results_md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
