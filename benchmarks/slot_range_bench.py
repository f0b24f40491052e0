"""The CPU reference's two decode strategies for rows on distinct scattered slots: the slot-range view
(one bmm over every slot between the lowest and highest used, unused ones included) against the gather
(a copy of each used slot's A and B, then a bmm over the copies).

    python -m benchmarks.slot_range_bench                   # pools of 32, 64, 128 slots
    python -m benchmarks.slot_range_bench --slots 32 --repeats 500

Shapes: one down_proj-sized projection of the bench model (`benchmarks.fixtures.LLAMA_50M`: in 512 for
the shrink, out 1376 for the expand), rank 16, float32, one torch thread; n one-row segments (decode) on
n distinct slots drawn at random from the pool. Each line: n, the span of the slots drawn, and the
microseconds of one shrink + expand by each strategy (best of two alternated passes of --repeats calls).
The figures behind `kernels.reference._MAX_RANGE_SLOTS_PER_ROW` come from this command.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from kernels import reference


def _time(n: int, num_slots: int, force_range: bool, repeats: int, pools) -> float:
    lora_a, lora_b, scale = pools
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

    def once() -> None:
        u = reference.sgmv_shrink(x, lora_a, seg_indptr, seg_slots, plan=plan)
        reference.sgmv_expand(u, lora_b, seg_indptr, seg_slots, y, scale, plan=plan)

    for _ in range(20):
        once()
    start = time.perf_counter()
    for _ in range(repeats):
        once()
    return (time.perf_counter() - start) / repeats * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slots", type=int, nargs="*", default=[32, 64, 128])
    parser.add_argument("--rows", type=int, nargs="*", default=[9, 12, 16, 24])
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
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
