"""StepMetadata: everything a forward pass needs besides the token ids, built once per step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from data_plane.model.native_lora import NativeLora
from data_plane.model.quant.native import NativeDecodeTables, NativeKvSlots
from openlora_kernels import SegmentPlan


@dataclass
class PrefillSpan:
    """One sequence's chunk of prompt (or recomputed) tokens within the flat batch."""

    start: int  # first row of the chunk in the batch
    num_tokens: int  # rows of the chunk
    num_cached: int  # tokens of this sequence already in the KV cache before the chunk
    block_ids: torch.Tensor  # (num_blocks,) int64 blocks holding the sequence's KV


@dataclass
class LoraSegments:
    """Rows grouped by adapter slot: segment g covers rows seg_indptr[g]:seg_indptr[g+1].

    Built once per step; every projection's shrink and expand reads the same kernel choice and plan."""

    seg_indptr: torch.Tensor  # (G+1,) int32
    seg_slots: torch.Tensor  # (G,) int32, -1 = no adapter
    max_rank: int  # largest rank among the slots used in this step
    max_segment_rows: int  # longest segment, known on the host: the kernels skip their index checks
    use_triton: bool  # the SGMV implementation of this step (`openlora_kernels.use_triton`, read once)
    plan: SegmentPlan | None  # the reference's plan of the layout; None on the Triton path
    # PEFT target modules (q_proj, ...) that some slot of the step adapts; the others skip SGMV. None: all.
    targets: frozenset[str] | None = None
    # Rank groups (reference path): when set, the LoRA is applied part by part, each part the same rows
    # with only its own slots' segments (the others -1) and its own `max_rank`, so that rows of small
    # adapters are not computed at a large adapter's rank. Empty: this layout in one pass.
    parts: tuple[LoraSegments, ...] = ()
    # The CPU's native SGMV kernels for this step (float32 pools, `OPENLORA_KERNELS` auto); when set, every
    # projection takes it and `plan` and `parts` are unused.
    native: NativeLora | None = None


@dataclass
class StepMetadata:
    positions: torch.Tensor  # (T,) int64
    kv_slot_ids: torch.Tensor  # (T,) int64 flat index block * block_size + offset where each row's KV goes
    prefills: list[PrefillSpan]
    decode_rows: torch.Tensor | None  # (D,) int64 rows of single-token decode sequences
    decode_block_tables: torch.Tensor | None  # (D, max_blocks) int64, padded with block 0
    decode_context_lens: torch.Tensor | None  # (D,) int64 tokens each decode sequence attends to
    max_decode_context_len: int  # the longest of them, known on the host (0 without decode rows)
    use_triton: bool  # Triton kernels for this step (`openlora_kernels.use_triton`, read once per step)
    lora: LoraSegments | None  # None when no row of the step uses an adapter
    # The decode rows' tables checked for the CPU's native decode attention (float32 caches,
    # `OPENLORA_KERNELS` auto); None: `openlora_kernels.paged_attention`'s torch or Triton path.
    native_decode: NativeDecodeTables | None = None
    # The step's KV slot ids checked for the CPU's native rotary and cache writes (float32 caches,
    # `OPENLORA_KERNELS` auto); None: `apply_rotary` and `index_copy_`.
    native_kv: NativeKvSlots | None = None
