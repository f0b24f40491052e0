"""SGMV shrink: u = x @ A[slot].T for every segment of rows, all adapters in one launch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from openlora_kernels.checks import (
    KernelArgumentError,
    check_contiguous,
    check_float,
    check_path,
    check_rows_layout,
    check_same_device,
    check_segments,
)

# Enough programs to fill an H200 (132 SMs) about twice; split-K is added below that.
_TARGET_PROGRAMS = 264
# Each split-K part covers at least this many BLOCK_K steps, so the atomic adds stay a small cost.
_MIN_K_STEPS_PER_SPLIT = 4


@triton.jit
def _shrink_segmented_kernel(
    x_ptr,  # (T, H_in), rows strided by x_row_stride
    a_ptr,  # (S, R, H_in) contiguous
    out_ptr,  # (T, R) contiguous; float32 and pre-zeroed when ATOMIC
    indptr_ptr,  # (G+1,) int32
    slots_ptr,  # (G,) int32
    ranks_ptr,  # (S,) int32, read only when HAS_RANKS
    in_features,
    rank_max,
    x_row_stride,
    k_per_split,
    num_rank_blocks,
    HAS_RANKS: tl.constexpr,
    ATOMIC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    segment = tl.program_id(0)
    row_block = tl.program_id(1) // num_rank_blocks
    rank_block = tl.program_id(1) % num_rank_blocks
    split = tl.program_id(2)
    seg_start = tl.load(indptr_ptr + segment)
    seg_end = tl.load(indptr_ptr + segment + 1)
    row0 = seg_start + row_block * BLOCK_M
    if row0 >= seg_end:
        return  # the grid covers the longest segment; shorter ones end early
    slot = tl.load(slots_ptr + segment).to(tl.int64)
    rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BLOCK_M,)
    cols = rank_block * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    out_ptrs = out_ptr + rows[:, None] * rank_max + cols[None, :]
    out_mask = (rows[:, None] < seg_end) & (cols[None, :] < rank_max)
    rank = rank_max
    if HAS_RANKS and slot >= 0:
        rank = tl.load(ranks_ptr + slot)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    # No adapter, or a rank block wholly in the zero padding: nothing to read, the result is zero.
    if slot >= 0 and rank_block * BLOCK_R < rank:
        col_mask = cols < rank
        k_begin = split * k_per_split
        k_end = tl.minimum(k_begin + k_per_split, in_features)
        a_base = a_ptr + slot * rank_max * in_features
        for k0 in range(k_begin, k_end, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
            k_mask = ks < k_end
            x_tile = tl.load(
                x_ptr + rows[:, None] * x_row_stride + ks[None, :],
                mask=(rows[:, None] < seg_end) & k_mask[None, :],
                other=0.0,
            )  # (BLOCK_M, BLOCK_K)
            a_tile = tl.load(
                a_base + cols[None, :] * in_features + ks[:, None],
                mask=col_mask[None, :] & k_mask[:, None],
                other=0.0,
            )  # (BLOCK_K, BLOCK_R): A[slot].T
            if UPCAST_DOT:  # the CPU interpreter gets bfloat16 tl.dot wrong; exact in float32
                x_tile = x_tile.to(tl.float32)
                a_tile = a_tile.to(tl.float32)
            acc = tl.dot(x_tile, a_tile, acc, input_precision=DOT_PRECISION)
    if ATOMIC:
        if slot >= 0:
            tl.atomic_add(out_ptrs, acc, mask=out_mask)
    elif split == 0:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


# True when TRITON_INTERPRET was set as this module was imported: the kernels run on the CPU.
_INTERPRETED = isinstance(_shrink_segmented_kernel, InterpretedFunction)


@triton.jit
def _shrink_bgmv_kernel(
    x_ptr,  # (T, H_in)
    a_ptr,  # (S, R, H_in)
    out_ptr,  # (T, R)
    indptr_ptr,
    slots_ptr,
    ranks_ptr,
    in_features,
    rank_max,
    x_row_stride,
    k_per_split,
    HAS_RANKS: tl.constexpr,
    ATOMIC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Every segment holds at most one row (decode): a matrix-vector product per row, no tensor cores.
    segment = tl.program_id(0)
    rank_block = tl.program_id(1)
    split = tl.program_id(2)
    row = tl.load(indptr_ptr + segment).to(tl.int64)
    if row >= tl.load(indptr_ptr + segment + 1):
        return  # empty segment
    slot = tl.load(slots_ptr + segment).to(tl.int64)
    cols = rank_block * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    rank = rank_max
    if HAS_RANKS and slot >= 0:
        rank = tl.load(ranks_ptr + slot)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    if slot >= 0 and rank_block * BLOCK_R < rank:
        col_mask = cols < rank
        k_begin = split * k_per_split
        k_end = tl.minimum(k_begin + k_per_split, in_features)
        a_base = a_ptr + slot * rank_max * in_features
        for k0 in range(k_begin, k_end, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < k_end
            x_vec = tl.load(x_ptr + row * x_row_stride + ks, mask=k_mask, other=0.0)  # (BLOCK_K,)
            a_tile = tl.load(
                a_base + cols[:, None] * in_features + ks[None, :],
                mask=col_mask[:, None] & k_mask[None, :],
                other=0.0,
            )  # (BLOCK_R, BLOCK_K)
            acc += a_tile.to(tl.float32) * x_vec.to(tl.float32)[None, :]
    u_vec = tl.sum(acc, axis=1)  # (BLOCK_R,)
    out_ptrs = out_ptr + row * rank_max + cols
    if ATOMIC:
        if slot >= 0:
            tl.atomic_add(out_ptrs, u_vec, mask=cols < rank_max)
    elif split == 0:
        tl.store(out_ptrs, u_vec.to(out_ptr.dtype.element_ty), mask=cols < rank_max)


def _pick_split_k(num_programs: int, in_features: int, block_k: int, split_k: int | None) -> tuple[int, int]:
    """(split_k, k_per_split); k_per_split is a multiple of block_k."""
    if split_k is None:
        max_useful = max(1, triton.cdiv(in_features, block_k * _MIN_K_STEPS_PER_SPLIT))
        split_k = max(1, min(_TARGET_PROGRAMS // max(1, num_programs), max_useful))
    if split_k < 1:
        raise KernelArgumentError("split_k", f"must be >= 1, got {split_k}")
    k_per_split = triton.cdiv(triton.cdiv(in_features, split_k), block_k) * block_k
    return triton.cdiv(in_features, k_per_split), k_per_split


def sgmv_shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    seg_indptr: torch.Tensor,
    seg_slots: torch.Tensor,
    slot_ranks: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    split_k: int | None = None,
    path: str | None = None,
    max_segment_rows: int | None = None,
) -> torch.Tensor:
    """Shrink every row by its segment's LoRA A matrix, in one launch.

    Shapes: x (T, H_in) with contiguous rows, lora_a (S, R, H_in) contiguous, seg_indptr (G+1,) int32,
    seg_slots (G,) int32 in [-1, S), slot_ranks (S,) int32 in [0, R] or None (all R).
    Returns u (T, R) in x's dtype (written into ``out`` when given: contiguous (T, R), x's dtype).

        for g in range(G):
            rows = range(seg_indptr[g], seg_indptr[g + 1]); s = seg_slots[g]
            u[rows] = 0 if s == -1 else x[rows] @ lora_a[s, :slot_ranks[s]].T  (zero beyond the rank)

    Products accumulate in float32. ``split_k`` splits H_in across programs (float32 atomics, then one
    cast); ``path`` forces "segmented" or "bgmv" (one row per segment only); both default by shape.

    Index ranges are checked with one device sync per call. A caller that built the layout on the host
    passes ``max_segment_rows`` (the longest segment) instead: no sync, and the values are trusted.
    """
    check_float("x", x, 2)
    check_float("lora_a", lora_a, 3, x.dtype)
    check_rows_layout("x", x)
    check_contiguous("lora_a", lora_a)
    check_same_device(
        x.device, lora_a=lora_a, seg_indptr=seg_indptr, seg_slots=seg_slots, slot_ranks=slot_ranks
    )
    num_rows, in_features = x.shape
    num_slots, rank_max, a_in = lora_a.shape
    if a_in != in_features:
        raise KernelArgumentError("lora_a", f"last dim {a_in} must equal x's H_in={in_features}")
    if out is not None:
        check_float("out", out, 2, x.dtype)
        check_contiguous("out", out)
        check_same_device(x.device, out=out)
        if tuple(out.shape) != (num_rows, rank_max):
            raise KernelArgumentError(
                "out", f"shape {tuple(out.shape)} must be (T, R)={(num_rows, rank_max)}"
            )
    layout = check_segments(
        seg_indptr, seg_slots, num_rows, num_slots, rank_max, slot_ranks, max_segment_rows
    )
    check_path(path, layout)

    u = out if out is not None else torch.empty(num_rows, rank_max, dtype=x.dtype, device=x.device)
    if num_rows == 0 or rank_max == 0 or in_features == 0 or layout.num_segments == 0:
        return u.zero_()
    use_bgmv = path == "bgmv" or (path is None and layout.max_segment_rows == 1)
    block_r = min(max(16, triton.next_power_of_2(rank_max)), 64)
    num_rank_blocks = triton.cdiv(rank_max, block_r)
    if use_bgmv:
        block_m, block_k = 1, min(256, 4096 // block_r)  # (BLOCK_R, BLOCK_K) float32 partial sums
    else:
        block_m = min(max(16, triton.next_power_of_2(layout.max_segment_rows)), 64)
        block_k = 128 if block_m <= 16 else 64
    num_row_blocks = triton.cdiv(layout.max_segment_rows, block_m)
    num_programs = layout.num_segments * num_row_blocks * num_rank_blocks
    split_k, k_per_split = _pick_split_k(num_programs, in_features, block_k, split_k)
    atomic = split_k > 1
    target = torch.zeros(num_rows, rank_max, dtype=torch.float32, device=x.device) if atomic else u
    has_ranks = slot_ranks is not None
    ranks_arg = slot_ranks if has_ranks else seg_slots  # never read when has_ranks is False

    if use_bgmv:
        grid = (layout.num_segments, num_rank_blocks, split_k)
        _shrink_bgmv_kernel[grid](
            x, lora_a, target, seg_indptr, seg_slots, ranks_arg,
            in_features, rank_max, x.stride(0), k_per_split,
            HAS_RANKS=has_ranks, ATOMIC=atomic, BLOCK_R=block_r, BLOCK_K=block_k,
        )  # fmt: skip
    else:
        grid = (layout.num_segments, num_row_blocks * num_rank_blocks, split_k)
        _shrink_segmented_kernel[grid](
            x, lora_a, target, seg_indptr, seg_slots, ranks_arg,
            in_features, rank_max, x.stride(0), k_per_split, num_rank_blocks,
            HAS_RANKS=has_ranks, ATOMIC=atomic,
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        UPCAST_DOT=_INTERPRETED and x.dtype == torch.bfloat16,
            BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k,
        )  # fmt: skip
    if atomic:
        u.copy_(target)
    return u
