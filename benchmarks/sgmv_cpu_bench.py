"""A step's LoRA on the CPU: the native SGMV kernels (`openlora_kernels/sgmv_cpu.c`) against the torch reference, on
the projections of the bench model and the layouts its benchmarks produce.

    python -m benchmarks.sgmv_cpu_bench
    python -m benchmarks.sgmv_cpu_bench --threads 1 --repeats 400 --cold-passes 41 --out FILE.json

Projections: a fused gate|up (in 512, out 1376 + 1376) and a down (in 1376, out 512) of
`benchmarks.fixtures.LLAMA_50M`, float32, 32 slots of rank up to 64, built as the engine builds them
(`LoRALinear.allocate_slots`: B outputs-contiguous on the CPU). Each line times the LoRA alone of both
projections (`LoRALinear._add_lora`, shrink and expand) with the step's segments given as the engine gives
them: the native kernels' `NativeLora`, or the reference's plan and rank groups (`ModelRunner._rank_parts`).
Layouts:
- best: 32 one-row segments on 32 distinct slots, rank 16 (engine_bench's best case);
- skewed: 32 rows drawn by a power law over the 32 slots, ranks 8/16/64 by slot (its skewed case);
- s1: 128 rows over 32 rank-16 slots by a power law (scenario 1's full steps);
- one segment of n rows (a prompt chunk), n in 8..256: where a matmul per segment overtakes the kernels,
  the figures behind `data_plane.model.native_lora.MAX_NATIVE_SEGMENT_ROWS`.
Best of --passes alternated passes of --repeats calls each, microseconds per call. These pools (two
projections) stay in a large L3 between calls.

Then the whole model's LoRA from memory: all 24 projections of the model (q|k|v, o, gate|up and down in 6
layers), 32 slots of rank 16 (pools of max rank 16, as engine_bench's best case has them: 120 MB of factors),
one and four rows per slot; a pass reads every factor once, more than any L3 here holds. The native
kernels over float32 slots and over float16 slots of the same values (how the engine holds an adapter whose
file is float16: 60 MB), and a float32 sum over the float32 pools in the same process: the rate this
machine reads those bytes at, which bounds any kernel that must read them. Median of --cold-passes passes, milliseconds per pass, and
the largest difference between the kernels' sums and the torch reference's over every projection.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import time
from types import SimpleNamespace

import torch

from benchmarks.fixtures import LLAMA_50M, ModelShape
from data_plane.engine.model_runner import ModelRunner
from data_plane.model.lora_linear import LoRALinear
from data_plane.model.metadata import LoraSegments
from data_plane.model.native_lora import NativeLora
from data_plane.model.quant.native import native_kernels, native_kernels_problem
from openlora_kernels import plan_segments

NUM_SLOTS, MAX_RANK = 32, 64


def _layer(
    in_features: int, outs: tuple[int, ...], ranks: list[int], gen: torch.Generator, max_rank: int = MAX_RANK
) -> LoRALinear:
    """A projection with one slot per entry of `ranks`, each loaded with a random adapter of that rank."""
    layer = LoRALinear(in_features, outs, bias=False)
    layer.allocate_slots(len(ranks), max_rank)
    for slot, rank in enumerate(ranks):
        for i, out in enumerate(outs):
            a, b = torch.randn(rank, in_features, generator=gen), torch.randn(out, rank, generator=gen)
            layer.load_slot(slot, a / in_features**0.5, b / rank**0.5, 0.5, index=i)
    return layer


def _power_law(rows: int, gen: random.Random) -> list[int]:
    weights = [1.0 / (k + 1) for k in range(NUM_SLOTS)]
    return sorted(gen.choices(range(NUM_SLOTS), weights=weights, k=rows))


def _grouped(slot_of_row: list[int]) -> tuple[list[int], list[int]]:
    bounds, slots = [0], []
    for slot in slot_of_row:
        if slots and slots[-1] == slot:
            bounds[-1] += 1
        else:
            slots.append(slot)
            bounds.append(bounds[-1] + 1)
    return bounds, slots


def _segments(
    kind: str,
    bounds: list[int],
    slots: list[int],
    ranks: list[int],
    num_slots: int = NUM_SLOTS,
    formats: list[torch.dtype] | None = None,
) -> LoraSegments:
    device = torch.device("cpu")
    used = [s for s in slots if s >= 0]
    longest = max(b - a for a, b in itertools.pairwise(bounds))
    common = dict(
        seg_indptr=torch.tensor(bounds, dtype=torch.int32),
        seg_slots=torch.tensor(slots, dtype=torch.int32),
        max_rank=max(ranks[s] for s in used),
        max_segment_rows=longest,
        use_triton=False,
    )
    if kind == "native":
        kernels = native_kernels()
        return LoraSegments(
            **common, plan=None, native=NativeLora.plan(bounds, slots, ranks, num_slots, kernels, formats)
        )
    plan = plan_segments(bounds, slots, device, ranks)
    runner = SimpleNamespace(slot_ranks=ranks, slot_targets=[frozenset()] * num_slots)
    parts = () if plan.use_loop else ModelRunner._rank_parts(runner, bounds, slots, used, longest, device)
    return LoraSegments(**common, plan=None if parts else plan, parts=parts)


def _time(layers, lora: LoraSegments, xs, repeats: int) -> float:
    ys = [torch.zeros(x.shape[0], layer.out_features) for layer, x in zip(layers, xs, strict=True)]
    start = time.perf_counter()
    for _ in range(repeats):
        for layer, x, y in zip(layers, xs, ys, strict=True):
            for part in lora.parts or (lora,):
                layer._add_lora(x, y, part)
    return (time.perf_counter() - start) / repeats * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--cold-passes", type=int, default=21, help="passes of the whole model from memory")
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if native_kernels() is None:
        raise SystemExit(f"the native kernels are unavailable: {native_kernels_problem()}")
    hidden, inter = LLAMA_50M.hidden_size, LLAMA_50M.intermediate_size
    rng = random.Random(0)
    layouts: dict[str, tuple[list[int], list[int], list[int]]] = {
        "best: 32 rows on 32 slots, r16": (*_grouped(list(range(32))), [16] * NUM_SLOTS),
        "skewed: 32 rows, power law, r8/16/64": (
            *_grouped(_power_law(32, rng)),
            [rng.choice([8, 16, 64]) for _ in range(NUM_SLOTS)],
        ),
        "s1: 128 rows, power law, r16": (*_grouped(_power_law(128, rng)), [16] * NUM_SLOTS),
    }
    for n in (8, 16, 32, 48, 64, 128, 256):
        layouts[f"one segment of {n} rows, r16"] = ([0, n], [3], [16] * NUM_SLOTS)
    results = []
    print(
        f"torch threads {args.threads}; microseconds of gate|up + down LoRA per step, best of {args.passes}"
    )
    print(f"{'layout':42s} {'native':>9s} {'reference':>10s} {'ref/native':>10s}")
    for name, (bounds, slots, ranks) in layouts.items():
        gen = torch.Generator().manual_seed(len(name))
        layers = [_layer(hidden, (inter, inter), ranks, gen), _layer(inter, (hidden,), ranks, gen)]
        xs = [torch.randn(bounds[-1], hidden, generator=gen), torch.randn(bounds[-1], inter, generator=gen)]
        lora = {kind: _segments(kind, bounds, slots, ranks) for kind in ("native", "reference")}
        best = {kind: float("inf") for kind in lora}
        for _ in range(args.passes):
            for kind in lora:
                best[kind] = min(best[kind], _time(layers, lora[kind], xs, args.repeats))
        ratio = best["reference"] / best["native"]
        print(f"{name:42s} {best['native']:9.1f} {best['reference']:10.1f} {ratio:10.2f}")
        results.append({"layout": name, "native_us": best["native"], "reference_us": best["reference"]})
    cold = [_from_memory(rows, args.cold_passes) for rows in (1, 4)]
    print(f"\nthe model's LoRA from memory: milliseconds per pass, median of {args.cold_passes}")
    print(
        f"{'layout':42s} {'native':>9s} {'GB/s':>6s} {'f16 slots':>9s} {'GB/s':>6s} {'sum':>7s} {'GB/s':>6s} "
        f"{'sum/native':>10s} {'max diff':>9s} {'f16 = f32':>9s}"
    )
    for c in cold:
        print(
            f"{c['layout']:42s} {c['native_ms']:9.2f} {c['factor_bytes'] / c['native_ms'] / 1e6:6.1f} "
            f"{c['native_f16_ms']:9.2f} {c['factor_bytes_float16'] / c['native_f16_ms'] / 1e6:6.1f} "
            f"{c['sum_ms']:7.2f} {c['factor_bytes'] / c['sum_ms'] / 1e6:6.1f} {c['sum_ms'] / c['native_ms']:10.2f} "
            f"{c['max_difference_from_reference']:9.1e} {c['float16_slots_equal_float32_slots']!s:>9s}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {"threads": args.threads, "repeats": args.repeats, "results": results, "from_memory": cold},
                f,
                indent=2,
            )


def _from_memory(
    rows_per_slot: int, passes: int, shape: ModelShape = LLAMA_50M, num_slots: int = NUM_SLOTS, rank: int = 16
) -> dict:
    """Every projection's LoRA of `shape` (q|k|v, o, gate|up, down in each layer; k and v as wide as q),
    `num_slots` slots of `rank`, `rows_per_slot` rows each: the native kernels' pass over float32 slots and
    over float16 slots of the same values (the engine's slots for a float16 adapter file), against a
    float32 sum over the float32 pools (see the module docstring)."""
    hidden, inter = shape.hidden_size, shape.intermediate_size
    projections = [(hidden, (hidden,) * 3), (hidden, (hidden,)), (hidden, (inter, inter)), (inter, (hidden,))]
    gen = torch.Generator().manual_seed(rows_per_slot)
    layers = [
        _layer(in_features, outs, [rank] * num_slots, gen, max_rank=rank)
        for in_features, outs in projections * shape.num_layers
    ]
    halves = []  # the same adapters in float16 slots; float32 ones hold the float16 values too
    for layer in layers:
        half = LoRALinear(layer.in_features, layer.out_slices, bias=False)
        half.allocate_slots(num_slots, rank)
        packed_a, packed_b = half.packed_pools(torch.float16)
        for pool in (layer.lora_a, *layer.lora_b):
            pool.copy_(pool.half().float())
        packed_a.copy_(layer.lora_a.half())
        for packed, b in zip(packed_b, layer.lora_b, strict=True):
            packed.copy_(b.half())
        half.lora_scale.copy_(layer.lora_scale)
        halves.append(half)
    bounds = list(range(0, num_slots * rows_per_slot + 1, rows_per_slot))
    lora = _segments("native", bounds, list(range(num_slots)), [rank] * num_slots, num_slots)
    lora_f16 = _segments(
        "native", bounds, list(range(num_slots)), [rank] * num_slots, num_slots, [torch.float16] * num_slots
    )
    xs = [torch.randn(bounds[-1], layer.in_features, generator=gen) for layer in layers]
    ys = [torch.zeros(bounds[-1], layer.out_features) for layer in layers]
    pools = [t for layer in layers for t in (layer.lora_a, *layer.lora_b)]

    def native() -> None:
        for layer, x, y in zip(layers, xs, ys, strict=True):
            layer._add_lora(x, y, lora)

    def native_f16() -> None:
        for layer, x, y in zip(halves, xs, ys, strict=True):
            layer._add_lora(x, y, lora_f16)

    def read() -> None:
        for pool in pools:
            pool.sum()

    arms = {"native": native, "native_f16": native_f16, "sum": read}
    times: dict[str, list[float]] = {name: [] for name in arms}
    for fn in arms.values():
        fn()  # warm-up: first touches, the library's first call
    for _ in range(passes):  # alternated, so all see the same machine
        for name, fn in arms.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    # the kernels' sums against the torch reference's, every projection once; float16 slots against
    # float32 ones of the same values, which must agree bit for bit
    reference = _segments("reference", bounds, list(range(num_slots)), [rank] * num_slots, num_slots)
    difference, f16_equal = 0.0, True
    for layer, half, x in zip(layers, halves, xs, strict=True):
        got, want = torch.zeros(x.shape[0], layer.out_features), torch.zeros(x.shape[0], layer.out_features)
        layer._add_lora(x, got, lora)
        for part in reference.parts or (reference,):
            layer._add_lora(x, want, part)
        difference = max(difference, (got - want).abs().max().item())
        got_f16 = torch.zeros(x.shape[0], layer.out_features)
        half._add_lora(x, got_f16, lora_f16)
        f16_equal = f16_equal and torch.equal(got_f16, got)
    factor_bytes = sum(pool.numel() * pool.element_size() for pool in pools)
    return {
        "layout": f"{len(layers)} projections, {num_slots} slots r{rank}, {rows_per_slot} row(s) each",
        "max_difference_from_reference": difference,
        "float16_slots_equal_float32_slots": f16_equal,
        "rows_per_slot": rows_per_slot,
        "factor_bytes": factor_bytes,
        "factor_bytes_float16": factor_bytes // 2,
        "native_ms": statistics.median(times["native"]) * 1e3,
        "native_f16_ms": statistics.median(times["native_f16"]) * 1e3,
        "sum_ms": statistics.median(times["sum"]) * 1e3,
    }


if __name__ == "__main__":
    main()
