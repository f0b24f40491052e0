"""The CPU reference's two decode strategies for rows on distinct scattered slots: the slot-range view
(one bmm over every slot between the lowest and highest used, unused ones included) against the gather
(a copy of each used slot's A and B, then a bmm over the copies).

    python -m benchmarks.slot_range_bench                   # pools of 32, 64, 128 slots
    python -m benchmarks.slot_range_bench --slots 32 --repeats 500
    python -m benchmarks.slot_range_bench --split           # a few long segments among many short ones

Shapes: one down_proj-sized projection of the bench model (`benchmarks.fixtures.LLAMA_50M`: in 512 for
the shrink, out 1376 for the expand), rank 16, float32, one torch thread; n one-row segments (decode) on
n distinct slots drawn at random from the pool. Each line: n, the span of the slots drawn, and the
microseconds of one shrink + expand by each strategy (best of two alternated passes of --repeats calls).
The figures behind `openlora_kernels.reference._MAX_RANGE_SLOTS_PER_ROW` come from this command. With --split:
mixed layouts on a 32-slot pool (a popular adapter's long segments beside the long tail's one-row ones),
the segment loop over every segment against the split plan (long segments looped, short ones batched);
the figures behind `_MIN_SPLIT_SHORT_SEGMENTS`.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from openlora_kernels import reference


def _time(n: int, num_slots: int, force_range: bool, repeats: int, pools) -> float:
    lora_a, lora_b, _ = pools
    saved = reference._MAX_RANGE_SLOTS_PER_ROW
    reference._MAX_RANGE_SLOTS_PER_ROW = 10**9 if force_range else 0
    try:
        slots = random.Random(n * 7919 + num_slots).sample(range(num_slots), n)
        seg_slots = torch.tensor(slots, dtype=torch.int32)
        seg_indptr = torch.arange(n + 1, dtype=torch.int32)
        plan = reference.SegmentPlan.from_tensors(seg_indptr, seg_slots)
        assert (plan.slot_range is not None) == force_range
    finally:
        reference._MAX_RANGE_SLOTS_PER_ROW = saved
    x = torch.randn(n, lora_a.shape[2])
    y = torch.zeros(n, lora_b.shape[1])
    return _timed(plan, x, y, seg_indptr, seg_slots, pools, repeats)


SPLIT_LAYOUTS = ([8, 5, 5] + [1] * 18, [6, 5] + [1] * 12 + [2] * 4, [12, 6, 5, 5] + [1] * 10, [5] + [1] * 27)


def _plan_with_split_threshold(bounds, slots, threshold: int):
    saved = reference._MIN_SPLIT_SHORT_SEGMENTS
    reference._MIN_SPLIT_SHORT_SEGMENTS = threshold
    try:
        return reference.SegmentPlan(bounds, slots, torch.device("cpu"))
    finally:
        reference._MIN_SPLIT_SHORT_SEGMENTS = saved


def _timed(plan, x, y, seg_indptr, seg_slots, pools, repeats: int) -> float:
    lora_a, lora_b, scale = pools

    def once() -> None:
        u = reference.sgmv_shrink(x, lora_a, seg_indptr, seg_slots, plan=plan)
        reference.sgmv_expand(u, lora_b, seg_indptr, seg_slots, y, scale, plan=plan)

    for _ in range(20):
        once()
    start = time.perf_counter()
    for _ in range(repeats):
        once()
    return (time.perf_counter() - start) / repeats * 1e6


def _split_figures(repeats: int) -> None:
    num_slots = 32
    generator = torch.Generator().manual_seed(num_slots)
    pools = (
        torch.randn(num_slots, 16, 512, generator=generator),
        torch.randn(num_slots, 1376, 16, generator=generator),
        torch.rand(num_slots, generator=generator),
    )
    print("long segments, short segments, rows: us per shrink + expand, loop / split (best of 2 passes)")
    for lengths in SPLIT_LAYOUTS:
        slots = random.Random(len(lengths)).sample(range(num_slots), len(lengths))
        bounds = [0]
        for n in lengths:
            bounds.append(bounds[-1] + n)
        seg_indptr = torch.tensor(bounds, dtype=torch.int32)
        seg_slots = torch.tensor(slots, dtype=torch.int32)
        default = reference.SegmentPlan(bounds, slots, torch.device("cpu"))
        loop = _plan_with_split_threshold(bounds, slots, 10**9)
        split = _plan_with_split_threshold(bounds, slots, 1)
        x = torch.randn(bounds[-1], 512)
        y = torch.zeros(bounds[-1], 1376)
        args = (x, y, seg_indptr, seg_slots, pools, repeats)
        loop_us = min(_timed(loop, *args), _timed(loop, *args))
        split_us = min(_timed(split, *args), _timed(split, *args))
        num_long = sum(1 for n in lengths if n > reference._MAX_ENTRY_ROWS)
        chosen = "split" if default.split is not None else "loop"
        print(
            f"{num_long:3d} {len(lengths) - num_long:3d} {bounds[-1]:4d}: {loop_us:6.0f} / {split_us:6.0f} "
            f"= {split_us / loop_us:.2f} (default plan: {chosen})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slots", type=int, nargs="*", default=[32, 64, 128])
    parser.add_argument("--rows", type=int, nargs="*", default=[9, 12, 16, 24])
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--split", action="store_true", help="time split plans of mixed layouts instead")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.split:
        _split_figures(args.repeats)
        return
    print(f"torch {torch.__version__}, 1 thread; us per shrink + expand (best of 2 passes)")
    print("slots  n  span  range_view  gather  gather/range")
    for num_slots in args.slots:
        generator = torch.Generator().manual_seed(num_slots)
        pools = (
            torch.randn(num_slots, 16, 512, generator=generator),
            torch.randn(num_slots, 1376, 16, generator=generator),
            torch.rand(num_slots, generator=generator),
        )
        for n in args.rows:
            if n > num_slots:
                continue
            slots = random.Random(n * 7919 + num_slots).sample(range(num_slots), n)
            span = max(slots) - min(slots) + 1
            times = {True: [], False: []}
            for _ in range(2):
                for force_range in (True, False):
                    times[force_range].append(_time(n, num_slots, force_range, args.repeats, pools))
            best_range, best_gather = min(times[True]), min(times[False])
            print(
                f"{num_slots:5d} {n:3d} {span:5d} {best_range:11.0f} {best_gather:7.0f} {best_gather / best_range:13.2f}"
            )


if __name__ == "__main__":
    main()
