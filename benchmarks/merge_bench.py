"""Merge build time and truncation error of each merge method, on the demo model and on one
Llama-3-8B-shaped layer.

    python -m benchmarks.merge_bench [--model DIR] [--methods ties,dare_linear,dare_ties,magnitude_prune]
        [--density 0.5] [--max-rank 64] [--llama-members 2] [--llama-rank 16] [--skip-llama]

Demo model: its three adapters (rank 8, all seven projections, 4 layers, hidden 128) merged with equal
weights. Llama-3-8B layer: hidden 4096, intermediate 14336, 32 query / 8 key-value heads of 128, one
layer, `--llama-members` random PEFT-format adapters of rank `--llama-rank` on all seven projections
(factors drawn N(0, 1/in) and N(0, 1/r), so each delta is rank-r and dense). Each build runs in a fresh
process (`build_merge`, the worker's code path, module by module; `--threads` torch threads, default 1),
timed with perf_counter; its peak
resident memory above the process's baseline is sampled every 5 ms, to compare with one module's merged
delta (the largest, 14336 x 4096 float32, is 224 MiB). The truncation error is the relative Frobenius
error of the re-factorization to rank min(max rank, sum of ranks) over the whole merge (and its worst
module). Prints a table and writes JSON to benchmarks/results/merge_bench.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.report import format_table

DEFAULT_MODEL_DIR = Path(".state/demo-model")
RESULTS_PATH = Path(__file__).parent / "results" / "merge_bench.json"
METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
LLAMA_SHAPES = {  # module -> (in, out) of Llama-3-8B
    "q_proj": (4096, 4096),
    "k_proj": (4096, 1024),
    "v_proj": (4096, 1024),
    "o_proj": (4096, 4096),
    "gate_proj": (4096, 14336),
    "up_proj": (4096, 14336),
    "down_proj": (14336, 4096),
}
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class MergeRow:
    model: str
    method: str
    num_sources: int
    density: float
    rank: int
    num_modules: int
    build_ms: float
    relative_error: float
    worst_module_error: float
    peak_extra_mib: float


def write_llama_layer_adapters(root: Path, num_members: int, rank: int) -> list[Path]:
    """`num_members` PEFT LoRA directories for layer 0 of a Llama-3-8B, all seven projections."""
    import torch
    from safetensors.torch import save_file

    from data_plane.fusion.builder import tensor_name

    dirs = []
    for member in range(num_members):
        generator = torch.Generator().manual_seed(member)
        tensors = {}
        for module, (in_features, out_features) in LLAMA_SHAPES.items():
            tensors[tensor_name(0, module, "A")] = torch.randn(rank, in_features, generator=generator) / (
                in_features**0.5
            )
            tensors[tensor_name(0, module, "B")] = torch.randn(out_features, rank, generator=generator) / (
                rank**0.5
            )
        path = root / f"llama8b-layer-r{rank}-{member}"
        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path / "adapter_model.safetensors"))
        config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": list(LLAMA_SHAPES)}
        (path / "adapter_config.json").write_text(json.dumps(config))
        dirs.append(path)
    return dirs


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE_BYTES


def _build_in_child(args: tuple) -> dict:
    """Runs in a fresh process: one build, its report and its peak resident memory above baseline."""
    source_dirs, method, density, max_rank, out_dir, num_threads = args
    import torch

    from data_plane.fusion.builder import build_merge
    from data_plane.fusion.spec import MergeSpec
    from openlora.artifact import digest_dir

    torch.set_num_threads(num_threads)
    shas = {digest_dir(d): Path(d) for d in source_dirs}
    spec = MergeSpec.of([(sha, 1.0 / len(shas)) for sha in shas], method, density).with_paths(shas)
    baseline = _rss_bytes()
    peak = [baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    report = build_merge(spec, Path(out_dir), max_rank)
    elapsed_ms = (time.perf_counter() - started) * 1000
    done.set()
    sampler.join()
    return {
        "rank": report.rank,
        "num_modules": report.num_modules,
        "build_ms": elapsed_ms,
        "relative_error": report.relative_error,
        "worst_module_error": report.max_module_error,
        "peak_extra_mib": (max(peak[0], _rss_bytes()) - baseline) / (1 << 20),
    }


def bench(
    model: str,
    source_dirs: list[Path],
    methods,
    density: float,
    max_rank: int,
    tmp: Path,
    num_threads: int = 1,
) -> list[MergeRow]:
    """One row per method: each built in a fresh process from `source_dirs` with equal weights."""
    rows = []
    context = multiprocessing.get_context("spawn")
    for method in methods:
        out_dir = tmp / f"{model}-{method}"
        with context.Pool(1) as pool:
            result = pool.apply(
                _build_in_child,
                ((list(map(str, source_dirs)), method, density, max_rank, out_dir, num_threads),),
            )
        rows.append(MergeRow(model, method, len(source_dirs), density, **result))
        print(
            f"  {model} {method}: {result['build_ms']:.0f} ms, error {result['relative_error']:.4f}",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--max-rank", type=int, default=64, help="the worker's max_lora_rank")
    parser.add_argument("--llama-members", type=int, default=2)
    parser.add_argument("--llama-rank", type=int, default=16)
    parser.add_argument("--skip-llama", action="store_true")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the build (the worker builds beside its engine)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_PATH)
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if not (args.model / "adapters").is_dir():
        from data_plane.demo import write_demo_model

        print(f"writing the demo model to {args.model} ...", flush=True)
        write_demo_model(args.model)
    load_before = os.getloadavg()[0]
    rows: list[MergeRow] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        demo_sources = sorted(p for p in (args.model / "adapters").iterdir() if p.is_dir())
        rows += bench("demo", demo_sources, methods, args.density, args.max_rank, tmp, args.threads)
        if not args.skip_llama:
            sources = write_llama_layer_adapters(tmp / "sources", args.llama_members, args.llama_rank)
            rows += bench("llama3-8b-layer", sources, methods, args.density, args.max_rank, tmp, args.threads)
    load_after = os.getloadavg()[0]
    header = [
        "model",
        "method",
        "sources",
        "density",
        "rank",
        "modules",
        "build ms",
        "relative error",
        "worst module",
        "peak extra MiB",
    ]
    table = [
        [
            r.model,
            r.method,
            r.num_sources,
            r.density,
            r.rank,
            r.num_modules,
            round(r.build_ms),
            round(r.relative_error, 4),
            round(r.worst_module_error, 4),
            round(r.peak_extra_mib),
        ]
        for r in rows
    ]
    print(format_table(header, table))
    print(f"load average (1 min) before / after: {load_before:.2f} / {load_after:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                "max_rank": args.max_rank,
                "density": args.density,
                "load_before": load_before,
                "load_after": load_after,
                "rows": [asdict(r) for r in rows],
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
