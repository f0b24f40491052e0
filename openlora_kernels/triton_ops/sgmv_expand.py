"""SGMV expand: y += scale[slot] * u @ B[slot].T for every segment of rows, all adapters in one launch."""

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


@triton.jit
def _expand_segmented_kernel(
    u_ptr,  # (T, R), rows strided by u_row_stride
    b_ptr,  # (S, H_out, R) contiguous
    y_ptr,  # (T, H_out), rows strided by y_row_stride; updated in place
    scale_ptr,  # (S,) float32
    indptr_ptr,  # (G+1,) int32
    slots_ptr,  # (G,) int32
    ranks_ptr,  # (S,) int32, read only when HAS_RANKS
    out_features,
    rank_max,
    u_row_stride,
    y_row_stride,
    num_out_blocks,
    HAS_RANKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    segment = tl.program_id(0)
    row_block = tl.program_id(1) // num_out_blocks
    out_block = tl.program_id(1) % num_out_blocks
    seg_start = tl.load(indptr_ptr + segment)
    seg_end = tl.load(indptr_ptr + segment + 1)
    row0 = seg_start + row_block * BLOCK_M
    slot = tl.load(slots_ptr + segment).to(tl.int64)
    if row0 >= seg_end or slot < 0:
        return  # past this segment's end, or no adapter: y stays as it is
    rank = rank_max
    if HAS_RANKS:
        rank = tl.load(ranks_ptr + slot)
    rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BLOCK_M,)
    row_mask = rows < seg_end
    ns = out_block * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    n_mask = ns < out_features
    b_base = b_ptr + slot * out_features * rank_max
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):  # a rank-8 slot in an R=64 pool reads 8 columns
        rs = r0 + tl.arange(0, BLOCK_R)
        r_mask = rs < rank
        u_tile = tl.load(
            u_ptr + rows[:, None] * u_row_stride + rs[None, :],
            mask=row_mask[:, None] & r_mask[None, :],
            other=0.0,
        )  # (BLOCK_M, BLOCK_R)
        b_tile = tl.load(
            b_base + ns[None, :] * rank_max + rs[:, None],
            mask=n_mask[None, :] & r_mask[:, None],
            other=0.0,
        )  # (BLOCK_R, BLOCK_N): B[slot].T
        if UPCAST_DOT:  # the CPU interpreter gets bfloat16 tl.dot wrong; exact in float32
            u_tile = u_tile.to(tl.float32)
            b_tile = b_tile.to(tl.float32)
        acc = tl.dot(u_tile, b_tile, acc, input_precision=DOT_PRECISION)
    scale = tl.load(scale_ptr + slot)
    y_ptrs = y_ptr + rows[:, None] * y_row_stride + ns[None, :]
    y_mask = row_mask[:, None] & n_mask[None, :]
    y_tile = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y_tile + scale * acc).to(y_ptr.dtype.element_ty), mask=y_mask)


# True when TRITON_INTERPRET was set as this module was imported: the kernels run on the CPU.
_INTERPRETED = isinstance(_expand_segmented_kernel, InterpretedFunction)


@triton.jit
def _expand_bgmv_kernel(
    u_ptr,  # (T, R)
    b_ptr,  # (S, H_out, R)
    y_ptr,  # (T, H_out)
    scale_ptr,
    indptr_ptr,
    slots_ptr,
    ranks_ptr,
    out_features,
    rank_max,
    u_row_stride,
    y_row_stride,
    HAS_RANKS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # Every segment holds at most one row (decode): a matrix-vector product per row, no tensor cores.
    segment = tl.program_id(0)
    out_block = tl.program_id(1)
    row = tl.load(indptr_ptr + segment).to(tl.int64)
    slot = tl.load(slots_ptr + segment).to(tl.int64)
    if row >= tl.load(indptr_ptr + segment + 1) or slot < 0:
        return
    rank = rank_max
    if HAS_RANKS:
        rank = tl.load(ranks_ptr + slot)
    ns = out_block * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    n_mask = ns < out_features
    b_base = b_ptr + slot * out_features * rank_max
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        r_mask = rs < rank
        u_vec = tl.load(u_ptr + row * u_row_stride + rs, mask=r_mask, other=0.0)  # (BLOCK_R,)
        b_tile = tl.load(
            b_base + ns[:, None] * rank_max + rs[None, :],
            mask=n_mask[:, None] & r_mask[None, :],
            other=0.0,
        )  # (BLOCK_N, BLOCK_R)
        acc += b_tile.to(tl.float32) * u_vec.to(tl.float32)[None, :]
    delta = tl.sum(acc, axis=1) * tl.load(scale_ptr + slot)  # (BLOCK_N,)
    y_ptrs = y_ptr + row * y_row_stride + ns
    y_vec = tl.load(y_ptrs, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y_vec + delta).to(y_ptr.dtype.element_ty), mask=n_mask)


def sgmv_expand(
    u: torch.Tensor,
    lora_b: torch.Tensor,
    seg_indptr: torch.Tensor,
    seg_slots: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    slot_ranks: torch.Tensor | None = None,
    *,
    path: str | None = None,
    max_segment_rows: int | None = None,
) -> None:
    """Expand every row by its segment's LoRA B matrix and add it to y in place, in one launch.

    Shapes: u (T, R) and y (T, H_out) with contiguous rows (y may be a column slice of a wider output),
    lora_b (S, H_out, R) contiguous, scale (S,) float32, seg_indptr (G+1,) int32, seg_slots (G,) int32
    in [-1, S), slot_ranks (S,) int32 in [0, R] or None (all R). u, lora_b and y share one dtype.

        for g in range(G):
            rows = range(seg_indptr[g], seg_indptr[g + 1]); s = seg_slots[g]
            if s != -1:
                k = slot_ranks[s]
                y[rows] += scale[s] * u[rows, :k] @ lora_b[s, :, :k].T

    The product and the sum with y are formed in float32 and rounded to y's dtype once. ``path`` forces
    "segmented" or "bgmv" (one row per segment only); the default picks by shape.

    Index ranges are checked with one device sync per call. A caller that built the layout on the host
    passes ``max_segment_rows`` (the longest segment) instead: no sync, and the values are trusted.
    """
    check_float("u", u, 2)
    check_float("lora_b", lora_b, 3, u.dtype)
    check_float("y", y, 2, u.dtype)
    check_rows_layout("u", u)
    check_rows_layout("y", y)
    check_contiguous("lora_b", lora_b)
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or scale.dim() != 1:
        raise KernelArgumentError("scale", "expected a 1-D torch.float32 tensor")
    check_contiguous("scale", scale)
    check_same_device(
        u.device, lora_b=lora_b, y=y, scale=scale, seg_indptr=seg_indptr, seg_slots=seg_slots,
        slot_ranks=slot_ranks,
    )  # fmt: skip
    num_rows, rank_max = u.shape
    num_slots, out_features, b_rank = lora_b.shape
    if b_rank != rank_max:
        raise KernelArgumentError("lora_b", f"last dim {b_rank} must equal u's R={rank_max}")
    if tuple(y.shape) != (num_rows, out_features):
        raise KernelArgumentError(
            "y", f"shape {tuple(y.shape)} must be (T, H_out)={(num_rows, out_features)}"
        )
    if scale.numel() != num_slots:
        raise KernelArgumentError("scale", f"length {scale.numel()} must equal S={num_slots}")
    layout = check_segments(
        seg_indptr, seg_slots, num_rows, num_slots, rank_max, slot_ranks, max_segment_rows
    )
    check_path(path, layout)
    if num_rows == 0 or rank_max == 0 or out_features == 0 or layout.num_segments == 0:
        return

    has_ranks = slot_ranks is not None
    ranks_arg = slot_ranks if has_ranks else seg_slots  # never read when has_ranks is False
    block_r = min(max(16, triton.next_power_of_2(rank_max)), 64)
    if path == "bgmv" or (path is None and layout.max_segment_rows == 1):
        block_n = max(16, 4096 // block_r)  # (BLOCK_N, BLOCK_R) float32 partial sums
        grid = (layout.num_segments, triton.cdiv(out_features, block_n))
        _expand_bgmv_kernel[grid](
            u, lora_b, y, scale, seg_indptr, seg_slots, ranks_arg,
            out_features, rank_max, u.stride(0), y.stride(0),
            HAS_RANKS=has_ranks, BLOCK_N=block_n, BLOCK_R=block_r,
        )  # fmt: skip
        return
    block_m = min(max(16, triton.next_power_of_2(layout.max_segment_rows)), 64)
    block_n = 128 if block_m <= 32 else 64
    num_out_blocks = triton.cdiv(out_features, block_n)
    grid = (layout.num_segments, triton.cdiv(layout.max_segment_rows, block_m) * num_out_blocks)
    _expand_segmented_kernel[grid](
        u, lora_b, y, scale, seg_indptr, seg_slots, ranks_arg,
        out_features, rank_max, u.stride(0), y.stride(0), num_out_blocks,
        HAS_RANKS=has_ranks,
        DOT_PRECISION="ieee" if u.dtype == torch.float32 else "tf32",
        UPCAST_DOT=_INTERPRETED and u.dtype == torch.bfloat16,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r,
    )  # fmt: skip
