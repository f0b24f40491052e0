"""Quantized base model on this machine: kernels, resident bytes, batch-1 decode latency, batch-32 throughput.

A ~370M-parameter Llama (hidden 1024, 20 layers, GQA 16/4 heads, intermediate 4096, vocab 32000; random
weights written by transformers, fp32; 304M of the parameters in the decoder linears) held four ways in
one process: fp32, bf16, int8 and int4 (the last two with fp32 activations, LoRA and KV cache). In one run:

1. kernels: each candidate matmul on a 4096x4096 weight at 1 and 32 rows (median of repeats); on the CPU
   also the native int4 kernel's fused path against its dequantize-then-GEMM path by rows (the crossover);
2. resident weight bytes per engine, all weights and the decoder linears alone (scales, offsets in);
3. batch-1 decode: one request with no adapter, decode steps timed one by one, the engines' steps
   interleaved (fp32, bf16, int8, int4, fp32, ...) so all see the same machine load; median step time;
4. throughput: 32 concurrent requests over 8 rank-16 adapters (request i on adapter i mod 8), all decoding;
   steady decode steps interleaved across engines as above; tokens/s = 32 / median step time.

Figures are ratios against fp32 measured in the same run. Prints tables, writes JSON.

    python -m benchmarks.quant_bench [--decode-steps 32] [--kernel-repeats 20] [--small]

With `--device cuda` (benchmarks/gpu_check.sh) the model is the 1.1B bf16 one, the engines bf16, int8 and
int4 (bf16 activations), and the ratios are against bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from benchmarks import fixtures
from benchmarks.report import format_table

RESULTS_PATH = Path(__file__).parent / "results" / "quant_bench.json"
LLAMA_370M = fixtures.ModelShape("bench-llama-370m", 1024, 20, 4096, 16, 4, 32000)
SMALL = fixtures.ModelShape("bench-llama-quant-small", 256, 2, 512, 4, 2, 1000)
ENGINES = {  # device type -> {name: (dtype, quantize)}; the first is the baseline of the ratios
    "cpu": {
        "fp32": ("float32", "none"),
        "bf16": ("bfloat16", "none"),
        "int8": ("float32", "int8"),
        "int4": ("float32", "int4"),
    },
    "cuda": {
        "bf16": ("bfloat16", "none"),
        "int8": ("bfloat16", "int8"),
        "int4": ("bfloat16", "int4"),
    },
}
NUM_ADAPTERS = 8
NUM_CONCURRENT = 32
PROMPT_TOKENS = 32
TARGETS = {  # (figure, engine) -> (bound, "<=" or ">=") as ratios to fp32
    ("decoder_linear_bytes", "int4"): (0.2, "<="),
    ("decoder_linear_bytes", "int8"): (0.3, "<="),
    ("batch1_step_ms", "int8"): (0.5, "<="),
    ("batch1_step_ms", "int4"): (1.0, "<="),
    ("batch32_tokens_per_s", "int8"): (1.0, ">="),
}


# -- kernels ---------------------------------------------------------------------------------------------


def _median_ms(fn, repeats: int, device: torch.device) -> float:
    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    fn()
    times = []
    for _ in range(repeats):
        synchronize()
        started = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def kernel_table(size: int, repeats: int, device: torch.device) -> list[dict]:
    """Median ms of each candidate y = x @ W.T on a (size, size) weight at 1 and 32 rows."""
    from torch.nn import functional as F

    from data_plane.model.quant import int8 as int8_module
    from data_plane.model.quant import make_quant_linear
    from data_plane.model.quant.int4 import NATIVE_MM_MAX_TOKENS, Int4Linear, dequantize_int4, quantize_int4

    g = torch.Generator().manual_seed(0)
    w = torch.randn(size, size, generator=g) * 0.02
    layers = {}
    for fmt in ("int8", "int4"):
        layers[fmt] = make_quant_linear(fmt, size, size, device)
        layers[fmt].load_weight(w.to(device))
    if device.type == "cuda":
        w_bf16 = w.to(device, torch.bfloat16)
        rows = []
        int8 = layers["int8"]
        for num_rows in (1, 32):
            x = torch.randn(num_rows, size, generator=g).to(device, torch.bfloat16)
            candidates = {
                "dense bf16 (F.linear)": lambda x=x: F.linear(x, w_bf16),
                "int8 Triton weight-only (openlora_kernels/triton_ops/int8_matmul.py) [chosen]": lambda x=x: (
                    int8.kernel(x)
                ),
                "int8 _weight_int8pack_mm": lambda x=x: torch.ops.aten._weight_int8pack_mm(
                    x, int8.qweight, int8.scale
                ),
                "int8 dequantize per call, then bf16 matmul": lambda x=x: F.linear(
                    x, int8.qweight.to(torch.bfloat16) * int8.scale.unsqueeze(1)
                ),
                "int4 tinygemm _weight_int4pack_mm [chosen]": lambda x=x: layers["int4"].kernel(x),
            }
            for name, fn in candidates.items():
                rows.append({"kernel": name, "rows": num_rows, "ms": _median_ms(fn, repeats, device)})
        return rows
    int8, int4 = layers["int8"], layers["int4"]
    tinygemm = Int4Linear(size, size, device, allow_native=False)
    tinygemm.load_weight(w)
    w_bf16 = w.to(torch.bfloat16)
    scale8 = int8.scale.float()
    codes, scale4, offset4 = quantize_int4(w, int4.group_size)  # the plain layout, for dequantize-per-call
    # Which int8 path float32 activations take on this machine (measured once per process, int8.py).
    two_digit = int8_module.two_digit_path_chosen()
    mark_two_digit, mark_packed = (" [chosen]", "") if two_digit else ("", " [chosen for fp32 here]")
    native = int4.native is not None
    native8 = int8.native.int8_weight(int8.qweight, int8.scale) if int8.native is not None else None
    mark_native, mark_tinygemm = (" [chosen]", "") if native else (" [unavailable here]", " [chosen]")
    rows = []
    for num_rows in (1, 32):
        native_path = "fused" if num_rows <= NATIVE_MM_MAX_TOKENS else "dequantized blocks + fp32 GEMM"
        x = torch.randn(num_rows, size, generator=g)
        # int8: few float32 rows take the native kernel, more the integer path chosen above
        int8_native = int8.uses_native(x)
        mark_int8_native = " [chosen]" if int8_native else ""
        mark_two_digit_here, mark_packed_here = ("", "") if int8_native else (mark_two_digit, mark_packed)
        x_bf16 = x.to(torch.bfloat16)
        candidates = {
            "dense fp32 (F.linear)": lambda x=x: F.linear(x, w),
            "dense bf16 (F.linear)": lambda x=x_bf16: F.linear(x, w_bf16),
            # fp32 activations as two int8 digits, each through torch._int_mm
            f"int8 native fp32 (int8_cpu.c){mark_int8_native}": lambda x=x: int8.native.int8_mm(x, native8),
            f"int8 two-digit _int_mm, fp32 activations{mark_two_digit_here}": lambda x=x: (
                int8_module.int8_two_digit_mm(x, int8.qweight, int8.scale, int8.two_digit_stacked)
            ),
            f"int8 _weight_int8pack_mm, bf16 activations{mark_packed_here}": lambda x=x_bf16: (
                torch.ops.aten._weight_int8pack_mm(x, int8.qweight, int8.scale)
            ),
            "int8 _weight_int8pack_mm, fp32 activations": lambda x=x: torch.ops.aten._weight_int8pack_mm(
                x, int8.qweight, scale8
            ),
            "int8 per-token dynamic activations (_int_mm)": lambda x=x: _int_mm_dynamic(
                x, int8.qweight, scale8
            ),
            f"int4 native fp32 (int4_cpu.c, {native_path}){mark_native}": lambda x=x: int4.kernel(x),
            f"int4 tinygemm, bf16 activations{mark_tinygemm}": lambda x=x: tinygemm.kernel(x),
            "int4 tinygemm, fp32 activations": lambda x=x: torch.ops.aten._weight_int4pack_mm_for_cpu(
                x, tinygemm.packed, tinygemm.group_size, tinygemm.scale_offset.float()
            ),
            "int4 dequantize per call, then fp32 matmul": lambda x=x: F.linear(
                x, dequantize_int4(codes, scale4, offset4)
            ),
        }
        slow_names = {
            "int8 _weight_int8pack_mm, fp32 activations",
            "int4 tinygemm, fp32 activations",
            "int4 dequantize per call, then fp32 matmul",
        }
        if not two_digit:  # no fast int8 product on this CPU: these two are slow too
            slow_names |= {
                "int8 two-digit _int_mm, fp32 activations",
                "int8 per-token dynamic activations (_int_mm)",
            }
        if not native:  # no library here: neither native kernel
            for name in [name for name in candidates if " native " in name]:
                del candidates[name]
        for name, fn in candidates.items():
            slow = name in slow_names
            count = max(3, repeats // 4) if slow else repeats
            rows.append({"kernel": name, "rows": num_rows, "ms": _median_ms(fn, count, device)})
    return rows


_CROSSOVER_COLUMNS = {  # key -> column title
    "fused_ms": "int4 native fused ms",
    "blocks_gemm_ms": "int4 native blocks + GEMM ms",
    "int8_native_ms": "int8 native ms",
    "int8_integer_ms": "int8 chosen integer path ms",
    "dense_fp32_ms": "dense fp32 ms",
}


def native_crossover(size: int, repeats: int) -> list[dict]:
    """The native CPU kernels against the other paths on a (size, size) weight, by rows of x: where int4's
    fused kernel stops beating its dequantize-then-GEMM path (int4.NATIVE_MM_MAX_TOKENS), and int8's
    stops beating the integer path this machine chose for float32 rows (int8.NATIVE_MM_MAX_TOKENS)."""
    from torch.nn import functional as F

    from data_plane.model.quant import int8 as int8_module
    from data_plane.model.quant import make_quant_linear

    g = torch.Generator().manual_seed(1)
    w = torch.randn(size, size, generator=g) * 0.02
    int4 = make_quant_linear("int4", size, size, torch.device("cpu"))
    int4.load_weight(w)
    int8 = make_quant_linear("int8", size, size, torch.device("cpu"))
    int8.load_weight(w)
    if int4.native is None:
        return []
    cpu = torch.device("cpu")
    native8 = int8.native.int8_weight(int8.qweight, int8.scale)

    def int8_integer(x: torch.Tensor) -> torch.Tensor:
        if int8.two_digit:
            return int8_module.int8_two_digit_mm(x, int8.qweight, int8.scale, int8.two_digit_stacked)
        return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), int8.qweight, int8.scale)

    rows = []
    for num_rows in (1, 2, 4, 8, 16, 24, 32, 64, 128):
        x = torch.randn(num_rows, size, generator=g)
        paths = {
            "fused_ms": lambda x=x: int4.native_fused(x),
            "blocks_gemm_ms": lambda x=x: int4.native_blocks(x),
            "int8_native_ms": lambda x=x: int8.native.int8_mm(x, native8),
            "int8_integer_ms": lambda x=x: int8_integer(x),
            "dense_fp32_ms": lambda x=x: F.linear(x, w),
        }
        rows.append({"rows": num_rows, **{key: _median_ms(fn, repeats, cpu) for key, fn in paths.items()}})
    return rows


def _int_mm_dynamic(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 x int8 -> int32 with each row of x quantized on the fly (per-token symmetric)."""
    x_scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127  # (T, 1)
    xq = torch.round(x / x_scale).to(torch.int8)
    return torch._int_mm(xq, qweight.T) * x_scale * scale


# -- engines ---------------------------------------------------------------------------------------------


@dataclass
class Bench:
    name: str
    engine: object  # LLMEngine
    adapters: list

    def add_requests(self, tag: str, num: int, max_tokens: int, with_adapters: bool) -> None:
        from data_plane.engine.request import EngineRequest, SamplingOptions

        vocab_size = self.engine.spec.vocab_size
        for i in range(num):
            prompt = [(31 * i + 7 * j) % (vocab_size - 3) + 3 for j in range(PROMPT_TOKENS)]  # past specials
            adapters = (self.adapters[i % len(self.adapters)],) if with_adapters else ()
            self.engine.add_request(
                EngineRequest(f"{tag}-{i}", prompt, SamplingOptions(max_tokens=max_tokens), adapters)
            )

    def steady(self, num: int) -> bool:
        scheduler = self.engine.scheduler
        return scheduler.num_running == num and all(s.num_pending_tokens == 1 for s in scheduler.running)

    def step(self, num: int) -> float | None:
        """One step; its seconds if all `num` requests were decoding one token each, else None."""
        steady = self.steady(num)
        started = time.perf_counter()
        outputs = self.engine.step()
        elapsed_s = time.perf_counter() - started
        for output in outputs:
            if output.error is not None:
                raise RuntimeError(f"{self.name}: {output.request_id} failed") from output.error
        return elapsed_s if steady else None

    def drain(self) -> None:
        while self.engine.has_unfinished():
            self.engine.step()


def make_bench(name: str, device: str, model_dir: Path, adapter_dirs: list[Path]) -> Bench:
    from data_plane.engine.config import EngineConfig
    from data_plane.engine.llm_engine import LLMEngine
    from data_plane.engine.request import AdapterRef
    from openlora.artifact import digest_dir

    dtype, quantize = ENGINES[torch.device(device).type][name]
    engine = LLMEngine(
        EngineConfig(
            model_dir=model_dir,
            device=device,
            dtype=dtype,
            quantize=quantize,
            num_adapter_slots=NUM_ADAPTERS,
            max_lora_rank=16,
            max_num_seqs=NUM_CONCURRENT,
            max_num_batched_tokens=NUM_CONCURRENT * PROMPT_TOKENS,
            kv_cache_bytes=128 << 20,
        )
    )
    refs = [AdapterRef(key=digest_dir(p), path=p, weight=1.0) for p in adapter_dirs]
    return Bench(name, engine, refs)


def interleaved_steps(
    benches: list[Bench], num: int, steps: int, max_tokens: int, with_adapters: bool
) -> dict:
    """Adds `num` requests to every engine, then steps them round-robin until each has `steps` steady
    decode steps; returns name -> list of step seconds."""
    for bench in benches:
        bench.add_requests(f"n{num}", num, max_tokens, with_adapters)
    times: dict[str, list[float]] = {b.name: [] for b in benches}
    for _ in range(20 * steps + 1000):
        if all(len(t) >= steps for t in times.values()):
            break
        for bench in benches:
            if len(times[bench.name]) < steps:
                elapsed_s = bench.step(num)
                if elapsed_s is not None:
                    times[bench.name].append(elapsed_s)
    else:
        raise RuntimeError(f"engines not steady: { {k: len(v) for k, v in times.items()} }")
    for bench in benches:
        for i in range(num):
            bench.engine.abort(f"n{num}-{i}")
        bench.drain()
    return times


def target_rows(figures: dict[str, dict[str, float]]) -> list[dict]:
    """Each target as (figure, engine, ratio to fp32, bound, met)."""
    rows = []
    for (figure, name), (bound, op) in TARGETS.items():
        if name not in figures or "fp32" not in figures:
            continue
        ratio = figures[name][figure] / figures["fp32"][figure]
        met = ratio <= bound if op == "<=" else ratio >= bound
        rows.append(
            {"figure": figure, "engine": name, "ratio_to_fp32": ratio, "target": f"{op} {bound}", "met": met}
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--decode-steps", type=int, default=32, help="counted steady steps per engine and batch"
    )
    parser.add_argument("--kernel-repeats", type=int, default=20)
    parser.add_argument("--kernel-size", type=int, default=4096)
    parser.add_argument("--small", action="store_true", help="a 2-layer model (a smoke run, not a figure)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (then the 1.1B bf16 model)")
    parser.add_argument("--out", type=Path, default=RESULTS_PATH)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shape = SMALL if args.small else fixtures.LLAMA_1B if device.type == "cuda" else LLAMA_370M
    engines = ENGINES[device.type]
    baseline = next(iter(engines))
    started = time.monotonic()
    load_before = os.getloadavg()

    kernels = kernel_table(args.kernel_size, args.kernel_repeats, device)
    print(
        format_table(["kernel", "rows", "ms"], [[k["kernel"], k["rows"], f"{k['ms']:.3f}"] for k in kernels])
    )

    crossover = native_crossover(args.kernel_size, args.kernel_repeats) if device.type == "cpu" else []
    if crossover:
        print(
            format_table(
                ["rows", *_CROSSOVER_COLUMNS.values()],
                [[c["rows"], *(f"{c[key]:.3f}" for key in _CROSSOVER_COLUMNS)] for c in crossover],
            )
        )

    model_dir = fixtures.ensure_model(shape)
    adapter_dirs = fixtures.ensure_adapters(NUM_ADAPTERS, shape, fixtures.AdapterSpec(rank=16))
    benches, load_s = [], {}
    for name in engines:
        load_started = time.monotonic()
        benches.append(make_bench(name, args.device, model_dir, adapter_dirs))
        load_s[name] = time.monotonic() - load_started
        print(f"{name}: loaded in {load_s[name]:.1f} s", flush=True)
    figures: dict[str, dict[str, float]] = {}
    for bench in benches:
        weights = bench.engine.runner.model.weight_bytes()
        figures[bench.name] = {
            "load_s": load_s[bench.name],
            "total_weight_bytes": weights.total_bytes,
            "decoder_linear_bytes": weights.decoder_linear_bytes,
            "decoder_bits_per_weight": weights.decoder_bits_per_weight,
        }
    phase_started = time.monotonic()
    batch1 = interleaved_steps(benches, 1, args.decode_steps, args.decode_steps + 8, with_adapters=False)
    print(f"batch-1 phase: {time.monotonic() - phase_started:.1f} s", flush=True)
    phase_started = time.monotonic()
    batch32 = interleaved_steps(
        benches, NUM_CONCURRENT, args.decode_steps, args.decode_steps + 8, with_adapters=True
    )
    print(f"batch-32 phase: {time.monotonic() - phase_started:.1f} s", flush=True)
    for name in engines:
        figures[name]["batch1_step_ms"] = statistics.median(batch1[name]) * 1000
        figures[name]["batch32_step_ms"] = statistics.median(batch32[name]) * 1000
        figures[name]["batch32_tokens_per_s"] = NUM_CONCURRENT / statistics.median(batch32[name])

    header = [
        "engine",
        "weights MiB",
        "decoder linears MiB",
        "bits/weight",
        "batch-1 ms/token",
        "batch-32 tok/s",
    ]
    rows = [
        [
            name,
            f"{f['total_weight_bytes'] / 2**20:.1f}",
            f"{f['decoder_linear_bytes'] / 2**20:.1f}",
            f"{f['decoder_bits_per_weight']:.2f}",
            f"{f['batch1_step_ms']:.1f}",
            f"{f['batch32_tokens_per_s']:.1f}",
        ]
        for name, f in figures.items()
    ]
    print(format_table(header, rows))
    ratios = {
        name: {figure: value / figures[baseline][figure] for figure, value in f.items()}
        for name, f in figures.items()
    }
    targets = target_rows(figures)
    if targets:
        print(
            format_table(
                ["figure", "engine", "ratio to fp32", "target", "met"],
                [
                    [t["figure"], t["engine"], f"{t['ratio_to_fp32']:.3f}", t["target"], t["met"]]
                    for t in targets
                ],
            )
        )
    else:  # no targets on this device: the ratios against its baseline
        shown = ("decoder_linear_bytes", "batch1_step_ms", "batch32_tokens_per_s")
        print(
            format_table(
                ["engine", *(f"{figure} / {baseline}" for figure in shown)],
                [[name, *(f"{r[figure]:.3f}" for figure in shown)] for name, r in ratios.items()],
            )
        )
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks.quant_bench", *(sys.argv[1:] if argv is None else argv)]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "torch_threads": torch.get_num_threads(),
        "model": {"shape": shape.name, "parameters": shape.num_parameters},
        "kernels": kernels,
        "int4_native_crossover": crossover,
        "engines": figures,
        "ratios_to": baseline,
        "ratios": ratios,
        "targets": targets,
        "seconds": time.monotonic() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"load average before {load_before}, after {os.getloadavg()}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
