"""Decode attention over the paged KV cache: one query token per sequence against its history (the whole
of it, or with a sliding window its last `window` tokens).

    out = paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)  # (D, heads, hd)

On CUDA the Triton kernel (`openlora_kernels.triton_ops.paged_decode`) reads K and V in place through the block
tables. On CPU a float32 model's steps (OPENLORA_KERNELS auto) take the native kernel of
`openlora_kernels/attention_cpu.c` instead of this module, which reads them in place as well (the model calls
`NativeDecodeTables.attend` over the step's tables, checked once by the model runner; 3.3-4.6x faster than
`bucketed_sdpa` per layer in `python -m benchmarks.attention_bench`, see benchmarks/RESULTS.md). Otherwise
one of the pure-torch paths below runs, all with the same signature and semantics (see the Triton
launcher's docstring):

- `gather_sdpa`: every sequence's blocks up to the longest table gathered into a padded (D, context)
  copy, then one masked SDPA (what the model's decode branch did before this module);
- `bucketed_sdpa`: sequences sorted by context length and cut into at most four groups, one gather and
  one SDPA per group (a group whose copy would pass `MAX_GATHER_BYTES` in several chunks), so each group
  pads only to its own longest context;
- `block_loop`: one block column of all sequences at a time with an online softmax, no padded copy of the
  whole history at once.

The CPU default is `bucketed_sdpa`, from `python -m benchmarks.attention_bench --repeats 10` at the bench
model's decode shapes (one layer, 128 sequences, contexts 32-120, block_size 16, 8 heads of 64, float32) on
a shared 2-core machine (load average 3.5-4.5 from other jobs, 11:57-11:58 UTC, three runs): bucketed_sdpa
took 0.47-0.49x gather_sdpa's time with torch's 2 threads and 0.46x with --threads 1; block_loop
0.50-0.54x. At 128 sequences with contexts 200-500 the 2-thread runs disagreed (bucketed 0.66x to 1.40x,
1-thread 0.62x). The padded gather writes a (128, 128, 8, 64) copy of K and of V that leaves the caches
before SDPA reads it back; a group's copy is smaller and holds little padding. An earlier version with
one group per block count (up to 8 groups here, 19 at 200-500) lost to gather_sdpa on 2 threads under
heavier load (load ~12: each op's threads spin at its barrier while other jobs hold the cores), hence at
most four groups. Rerun on a quiet machine before relying on the ratios; the default is `CPU_DEFAULT`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["CPU_PATHS", "block_loop", "bucketed_sdpa", "gather_sdpa", "paged_decode_attention"]


def gather_sdpa(q, k_cache, v_cache, block_tables, context_lens, scale, *, max_context_len=None, window=None):
    """The padded gather: (D, max_blocks * block_size) of K and V per sequence, then one masked SDPA (a
    window only masks: this path gathers every block)."""
    num_seqs, max_blocks = block_tables.shape
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    if max_context_len is not None:  # trailing table columns no sequence reaches
        max_blocks = min(max_blocks, -(-max_context_len // block_size))
        block_tables = block_tables[:, :max_blocks]
    context = max_blocks * block_size
    k = k_cache[block_tables].view(num_seqs, context, num_kv_heads, head_dim)
    v = v_cache[block_tables].view(num_seqs, context, num_kv_heads, head_dim)
    positions = torch.arange(context, device=q.device)
    mask = _attended(positions, context_lens, window).view(num_seqs, 1, 1, context)
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2),  # (D, heads, 1, head_dim)
        k.transpose(1, 2),  # (D, kv_heads, context, head_dim)
        v.transpose(1, 2),
        attn_mask=mask,
        scale=scale,
        enable_gqa=True,
    )  # (D, heads, 1, head_dim)
    return out.squeeze(2)


def _attended(positions, context_lens, window):
    """(D, len(positions)) bool: the positions each sequence's query attends to, those before its context
    length and, with a window, at or after context_lens - window (transformers' sliding window: the query
    at i sees i - window < j <= i)."""
    lens = context_lens.unsqueeze(1)  # (D, 1)
    mask = positions.unsqueeze(0) < lens
    if window is not None:
        mask &= positions.unsqueeze(0) >= lens - window
    return mask


_MAX_GROUPS = 4
# A gathered K or V copy is cut into chunks of sequences of at most this many bytes: larger blocks are
# mapped afresh by malloc at every allocation and their pages faulted in again (see
# data_plane.engine.host_memory), which doubled a 128-sequence step once its copies reached 25 MB.
MAX_GATHER_BYTES = 16 << 20


def bucketed_sdpa(
    q, k_cache, v_cache, block_tables, context_lens, scale, *, max_context_len=None, window=None
):
    """Sequences sorted by context length and cut into at most `_MAX_GROUPS` groups of equal count; per
    group one gather of the blocks up to its longest context and one masked SDPA. Few groups keep the ops
    few; sorted, each group pads little. With a window a group's gather starts at the block where its
    earliest window starts. Reads context_lens on the host (free on CPU, one sync elsewhere)."""
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    lens = context_lens.tolist()
    order = sorted(range(len(lens)), key=lens.__getitem__)
    num_groups = min(_MAX_GROUPS, len(lens))
    groups: dict[int, list[int]] = {}
    for g in range(num_groups):
        rows = order[g * len(lens) // num_groups : (g + 1) * len(lens) // num_groups]
        if rows:
            groups.setdefault(-(-lens[rows[-1]] // block_size), []).extend(rows)
    # The first block column a group reads: the block of its earliest attended position.
    firsts = {
        num_blocks: 0 if window is None else min(max(0, lens[r] - window) for r in rows) // block_size
        for num_blocks, rows in groups.items()
    }
    row_bytes = block_size * num_kv_heads * head_dim * k_cache.element_size()  # per block of one sequence
    chunks = [
        (firsts[num_blocks], num_blocks, rows[i : i + step])
        for num_blocks, rows in groups.items()
        for step in [max(1, MAX_GATHER_BYTES // (row_bytes * (num_blocks - firsts[num_blocks])))]
        for i in range(0, len(rows), step)
    ]
    out = torch.empty_like(q)  # (D, heads, head_dim)
    for first, num_blocks, rows in chunks:
        start, end = first * block_size, num_blocks * block_size  # the positions gathered
        context = end - start
        whole = len(rows) == len(lens)
        index = None if whole else torch.tensor(rows, device=q.device)
        tables = block_tables[:, first:num_blocks] if whole else block_tables[index, first:num_blocks]
        k = k_cache[tables].view(len(rows), context, num_kv_heads, head_dim)
        v = v_cache[tables].view(len(rows), context, num_kv_heads, head_dim)
        mask = None
        if any(lens[r] != end or (window is not None and lens[r] - window > start) for r in rows):
            group_lens = context_lens if whole else context_lens[index]
            positions = torch.arange(start, end, device=q.device)
            mask = _attended(positions, group_lens, window).view(len(rows), 1, 1, context)
        o = F.scaled_dot_product_attention(
            (q if whole else q[index]).unsqueeze(2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            scale=scale,
            enable_gqa=True,
        ).squeeze(2)  # (rows, heads, head_dim)
        if whole:
            return o
        out[index] = o
    return out


def block_loop(q, k_cache, v_cache, block_tables, context_lens, scale, *, max_context_len=None, window=None):
    """One block column of every sequence at a time, combined by an online softmax in float32; with a
    window, from the column where the earliest window starts (one host read of context_lens)."""
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    max_blocks = block_tables.shape[1]
    if max_context_len is not None:
        max_blocks = min(max_blocks, -(-max_context_len // block_size))
    qg = q.float().view(num_seqs, num_kv_heads, group, head_dim) * scale  # (D, kv_heads, group, hd)
    m = torch.full((num_seqs, num_kv_heads, group, 1), float("-inf"), device=q.device)
    s_sum = torch.zeros_like(m)
    acc = torch.zeros((num_seqs, num_kv_heads, group, head_dim), device=q.device)
    offsets = torch.arange(block_size, device=q.device)
    first = 0 if window is None else int((context_lens - window).clamp(min=0).min()) // block_size
    for j in range(first, max_blocks):
        blocks = block_tables[:, j]
        k = k_cache[blocks].float().permute(0, 2, 3, 1)  # (D, kv_heads, hd, block_size)
        v = v_cache[blocks].float().transpose(1, 2)  # (D, kv_heads, block_size, hd)
        scores = qg @ k  # (D, kv_heads, group, block_size)
        valid = _attended(j * block_size + offsets, context_lens, window)  # (D, block_size)
        scores = scores.masked_fill(~valid.view(num_seqs, 1, 1, block_size), float("-inf"))
        # A sequence past its end in this column keeps m = m_new; exp(-inf - finite) = 0 adds nothing.
        # One whose window starts in a later column has seen no key yet: the floor keeps m_new finite so
        # that exp(m - m_new) is 0, not exp(-inf + inf) = nan.
        m_new = torch.maximum(m, scores.amax(dim=-1, keepdim=True)).clamp(min=torch.finfo(torch.float32).min)
        alpha = torch.exp(m - m_new)
        p = torch.exp(scores - m_new)
        s_sum = s_sum * alpha + p.sum(dim=-1, keepdim=True)
        acc = acc * alpha + p @ v
        m = m_new
    return (acc / s_sum).view(num_seqs, num_heads, head_dim).to(q.dtype)


CPU_PATHS: dict[str, Callable[..., torch.Tensor]] = {
    "gather_sdpa": gather_sdpa,
    "bucketed_sdpa": bucketed_sdpa,
    "block_loop": block_loop,
}
CPU_DEFAULT = "bucketed_sdpa"


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    use_triton: bool | None = None,
    max_context_len: int | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """out (D, heads, head_dim) = each sequence's query attending to its first context_lens[d] cached
    tokens, found through block_tables (D, max_blocks) in k_cache, v_cache (num_blocks, block_size,
    kv_heads, head_dim); heads a multiple of kv_heads (GQA). ``window`` (a sliding-window layer's; None:
    the whole context): only the tokens at positions >= context_lens[d] - window. See
    `openlora_kernels.triton_ops.paged_decode.paged_decode_attention` for the exact semantics.

    ``use_triton``: None picks by device (Triton on CUDA, `CPU_DEFAULT` elsewhere); True forces the
    kernel (on CPU tensors it needs TRITON_INTERPRET=1 set before the kernel is first imported); False
    forces the CPU default. ``max_context_len``: the longest context when known on the host; the Triton
    path then skips its index checks and their device sync (values trusted).
    """
    if use_triton is None:
        use_triton = q.device.type == "cuda"
    if use_triton:
        from openlora_kernels.triton_ops.paged_decode import paged_decode_attention as triton_paged_decode

        return triton_paged_decode(
            q,
            k_cache,
            v_cache,
            block_tables,
            context_lens,
            scale,
            max_context_len=max_context_len,
            window=window,
        )
    return CPU_PATHS[CPU_DEFAULT](
        q, k_cache, v_cache, block_tables, context_lens, scale, max_context_len=max_context_len, window=window
    )
