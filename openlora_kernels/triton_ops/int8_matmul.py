"""Weight-only int8 matmul on CUDA: y = x @ (q * scale).T with q int8 (N, K) and a per-output-channel scale.

Decode reads every weight once per step, so at a few rows the cost is the weight's bytes: int8 halves
them against bfloat16. PyTorch's `_weight_int8pack_mm` on CUDA ran 5.6x slower than a bfloat16 matmul at
1 row and 48x at 32 rows on an H200 (benchmarks/RESULTS.md), so the int8 format has this kernel there:
each program loads a (BLOCK_K, BLOCK_N) tile of codes, widens it to the activation dtype in registers
(exact: |q| <= 127) and accumulates with tensor-core `tl.dot` in float32; the scale is applied once, to
the accumulated tile. Where the rows are many (prefill), the weight is dequantized once per call and a
dense matmul runs instead: its compute then dominates, and cuBLAS does that better than these tiles.
The codes are split along K (`SPLIT_K` programs per output tile, float32 partial sums reduced after the
launch in a fixed order, so results do not depend on scheduling) when the output tiles alone would leave
most of the GPU's multiprocessors idle; unsplit, the kernel writes the result in the activation dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# Rows at which the dequantize-then-matmul path takes over (prefill-sized inputs).
DENSE_MIN_ROWS = 128
# Programs that keep an H200's 132 multiprocessors busy; split-K is added below that.
_TARGET_PROGRAMS = 256
_MAX_SPLIT_K = 8


@triton.jit
def _w8_matmul_kernel(
    x_ptr,  # (M, K), rows strided by x_row_stride, unit stride along K
    q_ptr,  # (N, K) int8 contiguous
    scale_ptr,  # (N,)
    out_ptr,  # (M, N) in the activation dtype, or (SPLIT_K, M, N) float32 partial sums: contiguous
    M,
    N,
    K,
    x_row_stride,
    k_per_split,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BLOCK_M,)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # (BLOCK_N,)
    k_begin = split * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
        k_mask = ks < k_end
        x_tile = tl.load(
            x_ptr + rows[:, None] * x_row_stride + ks[None, :],
            mask=(rows[:, None] < M) & k_mask[None, :],
            other=0.0,
        )  # (BLOCK_M, BLOCK_K)
        q_tile = tl.load(
            q_ptr + cols[None, :] * K + ks[:, None],
            mask=(cols[None, :] < N) & k_mask[:, None],
            other=0,
        )  # (BLOCK_K, BLOCK_N): q.T
        if UPCAST_DOT:  # the CPU interpreter gets low-precision tl.dot wrong; exact in float32
            acc = tl.dot(x_tile.to(tl.float32), q_tile.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x_tile, q_tile.to(x_tile.dtype), acc)
    scale = tl.load(scale_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    acc = acc * scale[None, :]
    out_ptrs = out_ptr + split * M * N + rows[:, None] * N + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


# True when TRITON_INTERPRET was set as this module was imported: the kernel runs on the CPU.
_INTERPRETED = isinstance(_w8_matmul_kernel, InterpretedFunction)


def _tiles(num_rows: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) for this many rows: narrow output tiles and long K steps at
    decode sizes (many programs streaming the codes), wider tiles as the rows grow."""
    if num_rows <= 16:
        return 16, 32, 256, 4
    if num_rows <= 32:
        return 32, 64, 128, 4
    return 64, 64, 128, 4


def split_k_for(num_programs: int, k: int, block_k: int) -> int:
    """Parts to split K into so that about _TARGET_PROGRAMS programs run, each at least two BLOCK_K steps."""
    split = 1
    while (
        split < _MAX_SPLIT_K
        and num_programs * split * 2 <= _TARGET_PROGRAMS
        and k >= (split * 2) * 2 * block_k
    ):
        split *= 2
    return split


def int8_weight_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, K) float16/bfloat16/float32, qweight (N, K) int8, scale (N,) -> (M, N) in x's dtype."""
    if x.dim() != 2 or qweight.dim() != 2 or x.shape[1] != qweight.shape[1]:
        raise ValueError(f"x {list(x.shape)} and qweight {list(qweight.shape)} do not multiply")
    if scale.shape != (qweight.shape[0],):
        raise ValueError(f"scale has shape {list(scale.shape)}, expected [{qweight.shape[0]}]")
    m, k = x.shape
    n = qweight.shape[0]
    if m >= DENSE_MIN_ROWS:
        weight = qweight.to(x.dtype) * scale.to(x.dtype).unsqueeze(1)  # (N, K)
        return x @ weight.T
    if m == 0:
        return x.new_empty(0, n)
    if x.stride(1) != 1:
        x = x.contiguous()
    qweight = qweight.contiguous()
    block_m, block_n, block_k, num_warps = _tiles(m)
    grid_n, grid_m = triton.cdiv(n, block_n), triton.cdiv(m, block_m)
    split = split_k_for(grid_n * grid_m, k, block_k)
    k_per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    split = triton.cdiv(k, k_per_split)
    # One part writes the result itself; several write float32 partial sums, added after the launch.
    out = (
        torch.empty(m, n, dtype=x.dtype, device=x.device)
        if split == 1
        else x.new_empty(split, m, n, dtype=torch.float32)
    )
    _w8_matmul_kernel[(grid_n, grid_m, split)](
        x,
        qweight,
        scale,
        out,
        m,
        n,
        k,
        x.stride(0),
        k_per_split,
        UPCAST_DOT=_INTERPRETED,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
    )
    return out if split == 1 else out.sum(dim=0).to(x.dtype)
