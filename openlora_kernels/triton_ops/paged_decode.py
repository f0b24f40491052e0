"""Paged decode attention: one query token per sequence against its KV history (or, for a sliding-window
layer, its last `window` tokens), read in place from the paged cache through the sequence's block table
(no gathered copy), with an online softmax."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from openlora_kernels.checks import KernelArgumentError, check_contiguous, check_float, check_same_device


@triton.jit
def _paged_decode_kernel(
    q_ptr,  # (D, heads, head_dim), head_dim contiguous
    k_ptr,  # (num_blocks, block_size, kv_heads, head_dim) contiguous
    v_ptr,  # same as k
    tables_ptr,  # (D, max_blocks) int32/int64
    lens_ptr,  # (D,) int32/int64
    out_ptr,  # (D, heads, head_dim) contiguous
    scale,
    window,  # the layer's sliding window (read only when SLIDING)
    group,  # heads per kv head
    head_dim,
    block_size,
    q_seq_stride,
    q_head_stride,
    table_stride,
    cache_block_stride,
    cache_token_stride,
    out_seq_stride,
    GROUP_PAD: tl.constexpr,  # group rounded up to a power of two >= 16 (tl.dot's smallest tile)
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,  # tokens per tile, across cache blocks when block_size < BLOCK_N
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    SLIDING: tl.constexpr,  # attend to the last `window` tokens only; False compiles the window away
):
    # One program per (sequence, kv head): the group of query heads that share this kv head at once, so
    # each K/V tile is read once per group, not once per query head.
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    context = tl.load(lens_ptr + seq).to(tl.int64)
    heads = kv_head * group + tl.arange(0, GROUP_PAD)  # (GROUP_PAD,) query heads
    head_mask = tl.arange(0, GROUP_PAD) < group
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_mask = dims < head_dim
    q = tl.load(
        q_ptr + seq * q_seq_stride + heads[:, None] * q_head_stride + dims[None, :],
        mask=head_mask[:, None] & dim_mask[None, :],
        other=0.0,
    )  # (GROUP_PAD, HEAD_DIM_PAD)
    if UPCAST_DOT:  # the CPU interpreter gets low-precision tl.dot wrong; exact in float32
        q = q.to(tl.float32)
    m = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)  # running max of the scores
    s_sum = tl.zeros((GROUP_PAD,), dtype=tl.float32)  # running sum of exp(score - m)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM_PAD), dtype=tl.float32)  # running sum of exp(score - m) * v
    kv_offset = kv_head * head_dim
    first = 0  # the first position attended
    if SLIDING:
        first = tl.maximum(context - window, 0)
    # Tiles wholly before the window are skipped; the first tile read holds `first`, so none is empty.
    for start in range((first // BLOCK_N) * BLOCK_N, context, BLOCK_N):
        tokens = start + tl.arange(0, BLOCK_N)  # (BLOCK_N,) positions in the sequence
        token_mask = tokens < context
        if SLIDING:
            token_mask = token_mask & (tokens >= first)
        block = tl.load(tables_ptr + seq * table_stride + tokens // block_size, mask=token_mask, other=0)
        rows = block.to(tl.int64) * cache_block_stride + (tokens % block_size) * cache_token_stride
        kv_ptrs = rows[:, None] + kv_offset + dims[None, :]  # (BLOCK_N, HEAD_DIM_PAD)
        kv_mask = token_mask[:, None] & dim_mask[None, :]
        k = tl.load(k_ptr + kv_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_ptrs, mask=kv_mask, other=0.0)
        if UPCAST_DOT:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale  # (GROUP_PAD, BLOCK_N)
        scores = tl.where(token_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))  # finite: every tile holds at least one token
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        s_sum = s_sum * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new
    out = acc / s_sum[:, None]
    out_ptrs = out_ptr + seq * out_seq_stride + heads[:, None] * head_dim + dims[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=head_mask[:, None] & dim_mask[None, :])


# True when TRITON_INTERPRET was set as this module was imported: the kernel runs on the CPU.
_INTERPRETED = isinstance(_paged_decode_kernel, InterpretedFunction)

_INDEX_DTYPES = (torch.int32, torch.int64)


def _check_index(name: str, t: torch.Tensor, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise KernelArgumentError(name, f"expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim or t.dtype not in _INDEX_DTYPES:
        raise KernelArgumentError(
            name, f"expected {ndim} dims of int32 or int64, got {t.dtype} {tuple(t.shape)}"
        )
    if t.stride(-1) != 1:
        raise KernelArgumentError(name, f"last dim must be contiguous, strides are {t.stride()}")


def check_paged_decode_args(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    max_context_len: int | None,
) -> None:
    """Shapes, dtypes, layouts and devices; then the index values (one device sync) unless the caller
    vouches for them with `max_context_len`."""
    check_float("q", q, 3)
    check_float("k_cache", k_cache, 4, q.dtype)
    check_float("v_cache", v_cache, 4, q.dtype)
    if q.stride(-1) != 1:
        raise KernelArgumentError("q", f"last dim must be contiguous, strides are {q.stride()}")
    check_contiguous("k_cache", k_cache)
    check_contiguous("v_cache", v_cache)
    _check_index("block_tables", block_tables, 2)
    _check_index("context_lens", context_lens, 1)
    check_same_device(
        q.device, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, context_lens=context_lens
    )
    num_seqs, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    if tuple(v_cache.shape) != tuple(k_cache.shape):
        raise KernelArgumentError("v_cache", f"shape {tuple(v_cache.shape)} differs from k_cache's")
    if cache_head_dim != head_dim:
        raise KernelArgumentError("k_cache", f"head_dim {cache_head_dim} differs from q's {head_dim}")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise KernelArgumentError("k_cache", f"kv_heads {num_kv_heads} must divide q's heads {num_heads}")
    if block_tables.shape[0] != num_seqs:
        raise KernelArgumentError("block_tables", f"{block_tables.shape[0]} rows, q has {num_seqs} sequences")
    if context_lens.shape[0] != num_seqs:
        raise KernelArgumentError(
            "context_lens", f"length {context_lens.shape[0]}, q has {num_seqs} sequences"
        )
    capacity = block_tables.shape[1] * block_size
    if max_context_len is not None:
        if not 1 <= max_context_len <= capacity:
            raise KernelArgumentError("max_context_len", f"{max_context_len} outside [1, {capacity}]")
        return
    if num_seqs == 0:
        return
    lo, hi = torch.aminmax(context_lens)
    table_lo, table_hi = torch.aminmax(block_tables) if block_tables.numel() else (lo * 0, lo * 0)
    lo, hi, table_lo, table_hi = torch.stack([lo, hi, table_lo, table_hi]).tolist()  # the one sync
    if lo < 1 or hi > capacity:
        raise KernelArgumentError("context_lens", f"values in [{lo}, {hi}], must lie in [1, {capacity}]")
    if table_lo < 0 or table_hi >= num_blocks:
        raise KernelArgumentError(
            "block_tables", f"block ids in [{table_lo}, {table_hi}], cache has {num_blocks}"
        )


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    max_context_len: int | None = None,
    window: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Decode attention over a paged KV cache, in one launch of (sequences x kv heads) programs.

    Shapes: q (D, heads, head_dim) with head_dim contiguous; k_cache, v_cache (num_blocks, block_size,
    kv_heads, head_dim) contiguous, q's dtype (float16, bfloat16 or float32); block_tables (D, max_blocks)
    int32/int64, padded past each sequence's blocks with any valid block id; context_lens (D,) int32/int64
    in [1, max_blocks * block_size]. heads must be a multiple of kv_heads (GQA). Returns out (D, heads,
    head_dim) in q's dtype.

        for d, h:
            g = h // (heads // kv_heads); n = context_lens[d]
            slots = [block_tables[d, t // block_size] * block_size + t % block_size for t in range(n)]
            K, V = k_cache.view(-1, kv_heads, head_dim)[slots, g], likewise v    # (n, head_dim)
            if window is not None: K, V = K[max(0, n - window):], V[max(0, n - window):]
            out[d, h] = softmax(scale * K @ q[d, h]) @ V

    ``window`` (>= 1; None: the whole context) is a sliding-window layer's: the query, at position n - 1,
    sees the keys at n - window .. n - 1, as transformers' sliding mask (kv_idx > q_idx - window) does.
    Tiles wholly before the window are not read; without a window (or one no context exceeds, when
    ``max_context_len`` says so) the kernel is compiled without the window's code.

    Scores, softmax and the weighted sum accumulate in float32 (the probabilities are rounded to the
    cache's dtype for the second product, as flash attention does). Index values are checked with one
    device sync; a caller that built the tables on the host passes ``max_context_len`` instead: no sync,
    values trusted. ``block_n`` (tokens per tile, a power of two >= 16) is for tests.

    The context is not split across programs: a step of very few sequences with long contexts runs few
    programs (flash-decoding's split over the context would be the next step there).
    """
    check_paged_decode_args(q, k_cache, v_cache, block_tables, context_lens, max_context_len)
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise KernelArgumentError("window", f"expected None or an integer >= 1, got {window!r}")
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty((num_seqs, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_seqs == 0:
        return out
    if block_n is None:
        block_n = 64 if head_dim <= 64 else 32  # (BLOCK_N, head_dim) K and V tiles stay in registers
    elif block_n < 16 or block_n & (block_n - 1):
        raise KernelArgumentError("block_n", f"{block_n} must be a power of two >= 16")
    group = num_heads // num_kv_heads
    _paged_decode_kernel[(num_seqs, num_kv_heads)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        float(scale),
        window or 0,
        group,
        head_dim,
        block_size,
        q.stride(0),
        q.stride(1),
        block_tables.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        out.stride(0),
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM_PAD=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_N=block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST_DOT=_INTERPRETED,
        SLIDING=window is not None and (max_context_len is None or max_context_len > window),
    )
    return out
