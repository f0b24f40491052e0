"""A step's LoRA on the CPU through the native SGMV kernels (`openlora_kernels/sgmv_cpu.c`), float32 pools
whose slots hold float32, float16 or bfloat16 factors (`quant.native.SLOT_FORMATS`).

The torch reference (`openlora_kernels.reference`) pays a dispatch per segment or a padded batch for a many-adapter
step; the native kernels run every short segment of a projection in one call that reads each adapter's
factors once. Long segments (a prompt's chunk) stay one torch matmul each, where a GEMM beats the
kernels' dot products.

    native = NativeLora.plan(seg_bounds, seg_slots, slot_ranks, num_slots, kernels, slot_formats)  # per step
    native.add(x, y, lora_a, lora_b, lora_scale, slices, slice_bounds)              # per projection

Every short segment of a projection, shrink and each slice's expand, is one call (`NativeKernels.sgmv_lora`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from data_plane.model.quant.native import SLOT_FORMATS, LoraPools, NativeKernels, NativeSegments, packed_view

# Segments longer than this many rows run as torch matmuls. `python -m benchmarks.sgmv_cpu_bench`
# (2026-12-03, 2-core AMD EPYC with AVX-512, 2 threads): one segment of 8 to 32 rows costs about the same
# through the kernels as through a matmul pair (0.9-1.3x); many short segments 2-6x less.
MAX_NATIVE_SEGMENT_ROWS = 32


@dataclass(frozen=True)
class NativeLora:
    """A step's segments split between the kernels (short) and torch (long), for every projection."""

    kernels: NativeKernels
    short: NativeSegments  # what the kernels run
    # (start, end, slot, rank, the slot's format) of each long segment: a matmul each
    long: tuple[tuple[int, int, int, int, torch.dtype], ...]

    @classmethod
    def plan(
        cls,
        seg_bounds: list[int],
        seg_slots: list[int],
        slot_ranks: list[int],
        num_slots: int,
        kernels: NativeKernels,
        slot_formats: list[torch.dtype] | None = None,
    ) -> NativeLora:
        """The split of a layout (seg_indptr values, slots, -1 = no adapter) between the kernels and
        torch; ``slot_ranks`` and ``slot_formats`` (indexed by slot): each loaded adapter's rank and the
        element type its slot holds (float32 where not given)."""
        short, long, formats = [], [], []
        for (start, end), slot in zip(itertools.pairwise(seg_bounds), seg_slots, strict=True):
            if slot < 0 or end == start:
                continue
            dtype = torch.float32 if slot_formats is None else slot_formats[slot]
            if end - start <= MAX_NATIVE_SEGMENT_ROWS:
                short.append((start, end, slot, slot_ranks[slot]))
                formats.append(SLOT_FORMATS[dtype])
            else:
                long.append((start, end, slot, slot_ranks[slot], dtype))
        return cls(kernels, NativeSegments(short, seg_bounds[-1], num_slots, formats), tuple(long))

    def add(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        lora_a: torch.Tensor,
        lora_b: list[torch.Tensor],
        lora_scale: torch.Tensor,
        slices: list[int] | range,
        slice_bounds: list[tuple[int, int]],
        pools: LoraPools | None = None,
    ) -> None:
        """y (T, out) += the LoRA of every segment for the projection's ``slices``, in place.

        lora_a (S, R * n, in) rank-interleaved over the n slices, lora_b[i] (S, out_i, R), lora_scale
        (n, S) float32; slice i writes columns ``slice_bounds[i]`` of y. ``pools``: the same pools and
        slices already checked for the kernels (`NativeKernels.lora_pools`), else they are checked here."""
        x = x.contiguous()
        if self.short.count:
            if pools is None:
                pools = self.kernels.lora_pools(lora_a, lora_b, lora_scale, slices, slice_bounds, y.shape[1])
            self.kernels.sgmv_lora_pools(x, pools, self.short, y)
        if not self.long:
            return
        n = len(lora_b)
        max_rank = lora_a.shape[1] // n

        def held(pool: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            """`pool` as slots of `dtype` (a 16-bit slot's factors lie in its packed view)."""
            return pool if dtype == pool.dtype else packed_view(pool, dtype)

        # A long segment's shrink: one matmul over its rank's columns of every slice (rank-interleaved).
        # A 16-bit slot is widened whole and then cut, so that the matmuls see the strides a float32 slot
        # has, and give its floats.
        long_u = [
            x[row0:row1] @ held(lora_a, dtype)[slot].float()[: min(rank, max_rank) * n].T
            for row0, row1, slot, rank, dtype in self.long
        ]
        scales = lora_scale.tolist()
        for i in slices:
            start, end = slice_bounds[i]
            y_i = y if n == 1 else y[:, start:end]
            for (row0, row1, slot, rank, dtype), u_long in zip(self.long, long_u, strict=True):
                k = min(rank, max_rank)
                b = held(lora_b[i], dtype)[slot].float()[:, :k]
                y_i[row0:row1].addmm_(u_long[:, i::n], b.T, alpha=scales[i][slot])
