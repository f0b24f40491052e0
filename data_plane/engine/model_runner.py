"""ModelRunner: the one place that builds device tensors; owns the model, KV cache and adapter slots.

On CUDA, adapter loads copy into their slot on a side stream (from the loader thread) while forwards run
on the compute stream. Two CUDA events per slot order them: a load waits for the event recorded after the
last forward that read the slot (the adapter it overwrites may still be in use on the device), and the
next forward that reads the slot waits for the event recorded after its load. On CPU both are no-ops.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Iterable

import torch

import openlora_kernels as kernels
from data_plane.adapters.host_buffer import HostAdapter, unpack
from data_plane.adapters.weights import AdapterWeights, LoraFactors
from data_plane.engine.sequence import Sequence
from data_plane.model.llama import LlamaForCausalLM
from data_plane.model.lora_linear import SlotWrites
from data_plane.model.metadata import LoraSegments, PrefillSpan, StepMetadata
from data_plane.model.native_lora import NativeLora
from data_plane.model.quant.native import attention_shape_problem, native_kernels
from openlora.base_model import PROJECTIONS


class StepStaging:
    """One step's integer metadata of one dtype, packed into a preallocated host buffer (pinned on CUDA)
    and moved to the device in one copy; the step's tensors are slices of the device buffer (on CPU, of
    the host buffer itself). Grows by doubling when a step needs more room.

    The buffers are reused by the next step: on CPU a step's forward has finished when the next one is
    built; on CUDA the next pack waits for the previous host-to-device copy (long done by then) before
    overwriting the host buffer, and the device buffer is rewritten in stream order after the forward
    that read it."""

    def __init__(self, dtype: torch.dtype, device: torch.device, capacity: int) -> None:
        self.dtype, self.device = dtype, device
        self._pinned = device.type == "cuda"
        self._copied: torch.cuda.Event | None = None
        self._allocate(max(capacity, 1))

    def _allocate(self, capacity: int) -> None:
        self._host = torch.empty(capacity, dtype=self.dtype, pin_memory=self._pinned)
        self._host_np = self._host.numpy()
        self._device = self._host if not self._pinned else torch.empty_like(self._host, device=self.device)

    def pack(self, parts: list[list[int]]) -> list[torch.Tensor]:
        """The lists as 1-D tensors on the device (slices of one buffer), in order."""
        total = sum(len(part) for part in parts)
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy has read the host buffer
            self._copied = None
        if total > self._host.numel():
            self._allocate(max(total, 2 * self._host.numel()))
        bounds = []
        offset = 0
        for part in parts:
            end = offset + len(part)
            self._host_np[offset:end] = part
            bounds.append((offset, end))
            offset = end
        if self._pinned:
            self._device[:total].copy_(self._host[:total], non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record(torch.cuda.current_stream(self.device))
        return [self._device[start:end] for start, end in bounds]


def rank_groups(ranks: Iterable[int]) -> dict[int, int]:
    """Each rank -> the top rank of its group: ranks are grouped from the largest down, a rank joining the
    group above while it is at least half that group's top (so 8 joins 16, 16 does not join 64)."""
    top_of: dict[int, int] = {}
    top = 0
    for rank in sorted(set(ranks), reverse=True):
        if 2 * rank < top or not top:
            top = rank
        top_of[rank] = top
    return top_of


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        num_kv_blocks: int,
        block_size: int,
        num_adapter_slots: int,
        max_lora_rank: int,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
    ) -> None:
        """`max_num_seqs` and `max_num_batched_tokens` size the step-metadata buffers up front (a larger
        step grows them)."""
        self.model = model
        spec = model.config.spec
        # The embedding is never quantized: it holds the activation dtype (lm_head may be quantized).
        self.device = model.model.embed_tokens.weight.device
        self.dtype = model.model.embed_tokens.weight.dtype
        self.block_size = block_size
        self.num_kv_blocks = num_kv_blocks
        # One block more than the scheduler hands out: `pad_block`, never written, always zero, fills the
        # decode block tables past a sequence's own blocks (a live block there could hold another request's
        # NaN or infinite K/V, which a masked score does not cancel).
        self.pad_block = num_kv_blocks
        shape = (num_kv_blocks + 1, block_size, spec.num_key_value_heads, spec.head_dim)
        for layer in model.model.layers:
            layer.self_attn.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            layer.self_attn.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        model.allocate_lora_slots(num_adapter_slots, max_lora_rank)
        self.max_lora_rank = max_lora_rank
        # The CPU's native SGMV kernels (float32 pools only), None where they cannot be built (the torch
        # reference serves then); used on steps whose OPENLORA_KERNELS is auto.
        self._native_sgmv = (
            native_kernels() if self.device.type == "cpu" and self.dtype == torch.float32 else None
        )
        # Its decode attention too (float32 caches in the shapes attention_cpu.c takes), read in place
        # through the block tables instead of the torch path's gathered copies, and the rotary embedding
        # and cache writes of every row in one call; on auto steps as well.
        self._native_attention = (
            self._native_sgmv
            if attention_shape_problem(
                spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim, block_size
            )
            is None
            else None
        )
        # A slot holds an adapter whose file is float16 or bfloat16 in that format, where the native kernels
        # read the pools (they widen it as they load it: the products are those of the float32 values, with
        # half the bytes read); the torch reference cannot, so an engine that started on the native kernels
        # keeps its LoRA on them for its life, whatever OPENLORA_KERNELS says later (the adapters it holds
        # were written for them).
        self.packs_slots = self._native_sgmv is not None and kernels.kernel_choice() == "auto"
        self.slot_ranks = [0] * num_adapter_slots
        self.slot_formats = [self.dtype] * num_adapter_slots  # the element type each slot holds
        # Per slot: how far its loads may have written, in rank x element bytes (a rank of a 16-bit slot is
        # half a rank of the float32 pools' bytes); every byte of the slot from there on is zero.
        self._slot_written_extent = [0] * num_adapter_slots
        self.slot_targets: list[frozenset[str]] = [frozenset()] * num_adapter_slots  # PEFT modules adapted
        # Adapter loads copy on their own stream so they overlap the forward pass on the default one.
        self._load_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # Per slot (CUDA only): the compute-stream event after the last forward that read it (written by
        # the engine thread before the slot is reserved for a load), and the load-stream event after its
        # last write (written by the loader thread before the load is reported done).
        self._slot_read_events: list[torch.cuda.Event | None] = [None] * num_adapter_slots
        self._slot_write_events: list[torch.cuda.Event | None] = [None] * num_adapter_slots
        # Recorded slot writes by (slot, rank written before, factor ranks); CUDA: the staging buffer of
        # each host dtype and its views per adapter layout. Bounded, least recently used out first.
        self._max_slot_plans = 4 * num_adapter_slots
        self._slot_plans: OrderedDict[tuple, SlotWrites] = OrderedDict()
        self._slot_plans_lock = threading.Lock()
        self._staging: dict[torch.dtype, torch.Tensor] = {}
        self._staging_views: dict[torch.dtype, OrderedDict[tuple, tuple]] = {}
        self._staging_lock = threading.Lock()
        self._int64 = StepStaging(torch.int64, self.device, 4 * max_num_batched_tokens)
        self._int32 = StepStaging(torch.int32, self.device, 2 * max_num_seqs + 1)

    @staticmethod
    def kv_bytes_per_block(model: LlamaForCausalLM, block_size: int, dtype: torch.dtype) -> int:
        spec = model.config.spec
        element_bytes = torch.empty((), dtype=dtype).element_size()
        return 2 * spec.num_layers * block_size * spec.num_key_value_heads * spec.head_dim * element_bytes

    def load_adapter(self, slot: int, weights: AdapterWeights) -> None:
        """Copies an adapter's factors into `slot` of every projection (a fused one's slice for q, k, v,
        gate and up); absent ones are cleared. Ranks at or past what the slot's earlier loads wrote are
        zero already and are not written again: a rank-16 adapter in rank-64 pools writes its 16 ranks
        (and zeroes what a larger predecessor left), not all 64. Factors all float16 or all bfloat16 are
        kept in that format (`slot_format`)."""
        ranks = {key: factors.a.shape[0] for key, factors in weights.factors.items()}
        rank = max(ranks.values(), default=0)
        dtype = self.slot_format(weights)
        size = dtype.itemsize
        extent = self._slot_written_extent[slot]
        # The ranks of this format that hold what earlier loads wrote (a 16-bit view of the slot spans half
        # its bytes: what lies past it is never read in this format, and is zeroed by a later float32 load).
        written = min(-(-extent // size), self.max_lora_rank)
        # Raised before the writes: should they fail halfway, the next load still zeroes what they wrote.
        self._slot_written_extent[slot] = max(extent, rank * size)
        self._slot_plan(slot, written, ranks, dtype).apply(weights.factors)
        beyond_view = extent > self.max_lora_rank * size
        self._slot_written_extent[slot] = extent if beyond_view else rank * size
        self.slot_ranks[slot] = weights.rank
        self.slot_formats[slot] = dtype
        self.slot_targets[slot] = frozenset(name for _, name in weights.factors)

    def slot_format(self, weights: AdapterWeights) -> torch.dtype:
        """The element type a slot holds `weights` in: their own where every factor is float16, or every
        one bfloat16, and the native kernels read the slots (`packs_slots`); else the pools' dtype (the
        copy converts: widening, or to the pools' half precision on a GPU)."""
        dtypes = {t.dtype for f in weights.factors.values() for t in (f.a, f.b)}
        if self.packs_slots and len(dtypes) == 1 and dtypes <= {torch.float16, torch.bfloat16}:
            return dtypes.pop()
        return self.dtype

    def _slot_plan(
        self, slot: int, written: int, ranks: dict[tuple[int, str], int], dtype: torch.dtype
    ) -> SlotWrites:
        """The writes of a load of these factor ranks into `slot` in format `dtype` when its earlier loads
        wrote up to rank `written` (of that format), recorded once and kept (least recently used first
        out): a worker's adapters mostly share a few shapes, so a load replays a record instead of making
        its views again."""
        key = (slot, written, tuple(sorted(ranks.items())), dtype)
        with self._slot_plans_lock:
            plan = self._slot_plans.get(key)
            if plan is not None:
                self._slot_plans.move_to_end(key)
                return plan
        plan = SlotWrites()
        for layer in range(len(self.model.model.layers)):
            targets = self.model.lora_targets(layer)
            for name in PROJECTIONS:
                module, index = targets[name]
                rank = ranks.get((layer, name))
                factor_key = None if rank is None else (layer, name)
                module.slot_writes(
                    plan, slot, factor_key, rank or 0, index, written_rank=written, dtype=dtype
                )
        with self._slot_plans_lock:
            self._slot_plans[key] = plan
            while len(self._slot_plans) > self._max_slot_plans:
                self._slot_plans.popitem(last=False)
        return plan

    def slot_contents(self, slot: int) -> list[torch.Tensor]:
        """Copies of every pool entry and scale of `slot` as its format holds them, widened to the pools'
        dtype, in every layer and projection (for checks)."""
        contents = []
        for layer in range(len(self.model.model.layers)):
            for module in {id(m): m for m, _ in self.model.lora_targets(layer).values()}.values():
                a, bs = module.slot_factors(slot, self.slot_formats[slot])
                contents += [a, module.lora_scale[:, slot].clone(), *bs]
        return contents

    def install_from_host(self, slot: int, host: HostAdapter) -> None:
        """Copies a packed adapter into `slot`: on CUDA one host-to-device copy of its buffer into a staging
        buffer on the load stream, then device-side copies into the pools; returns once the slot is
        written. Called from the loader thread: the slot is reserved (LOADING), so no step launched from
        now on reads it; one launched before may still run on the device, and the copy waits for it."""
        if self._load_stream is None:
            self.load_adapter(slot, unpack(host))
            return
        stream = self._load_stream
        with self._staging_lock, torch.cuda.stream(stream):
            last_read = self._slot_read_events[slot]
            if last_read is not None:
                stream.wait_event(last_read)  # the forward reading the adapter we overwrite ends first
            self.load_adapter(slot, self._staged(host))
            written = torch.cuda.Event()
            written.record(stream)
            self._slot_write_events[slot] = written
            stream.synchronize()  # the staging and host buffers are not used past this point

    def _staged(self, host: HostAdapter) -> AdapterWeights:
        """`host` copied (on the current stream) into the device staging buffer of its dtype, as views:
        the buffer is kept and grows to the largest adapter, and its views are made once per layout."""
        buffer, dtype, size = host.buffer, host.buffer.dtype, host.buffer.numel()
        staging = self._staging.get(dtype)
        if staging is None or staging.numel() < size:
            staging = self._staging[dtype] = torch.empty(size, dtype=dtype, device=self.device)
            self._staging_views[dtype] = OrderedDict()
        views_by_layout = self._staging_views[dtype]
        signature = host.shape_signature
        views = views_by_layout.get(signature)
        if views is None:
            flat = staging[:size]
            views = views_by_layout[signature] = (flat, unpack(host, flat).factors)
            while len(views_by_layout) > self._max_slot_plans:
                views_by_layout.popitem(last=False)
        else:
            views_by_layout.move_to_end(signature)
        flat, factors = views  # made in layout order: the layout's scales pair with them in order
        flat.copy_(buffer, non_blocking=True)
        scaled = {
            key: LoraFactors(f.a, f.b, p.scale)
            for (key, f), p in zip(factors.items(), host.layout, strict=True)
        }
        return AdapterWeights(rank=host.rank, factors=scaled)

    @torch.inference_mode()
    def clear_blocks(self, block_ids: list[int]) -> None:
        """Zeroes the K and V of these blocks in every layer (blocks freed since the last step)."""
        if not block_ids:
            return
        index = torch.tensor(block_ids, dtype=torch.int64).to(self.device, non_blocking=True)
        for layer in self.model.model.layers:
            layer.self_attn.k_cache.index_fill_(0, index, 0)
            layer.self_attn.v_cache.index_fill_(0, index, 0)

    @torch.inference_mode()
    def run(
        self, seqs: list[Sequence], num_tokens: list[int], slots: list[int]
    ) -> tuple[list[int], torch.Tensor]:
        """One forward pass over `num_tokens[i]` pending tokens of each sequence.

        `slots[i]` is the adapter slot of sequence i (-1: none). Returns (indices of the sequences that
        reached their last token and so get a sample, logits (N, vocab) float32 for them, in that order).
        """
        # Group rows by adapter slot so each adapter is one contiguous segment (stable: keeps arrival order).
        order = sorted(range(len(seqs)), key=lambda i: slots[i])
        input_ids: list[int] = []
        positions: list[int] = []
        kv_slot_ids: list[int] = []
        prefill_parts: list[tuple[int, int, int, list[int]]] = []  # (row, num_tokens, num_cached, block ids)
        decode_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        sample_seq_ids: list[int] = []
        sample_rows: list[int] = []
        seg_indptr = [0]
        seg_slots: list[int] = []
        block_size, device = self.block_size, self.device
        for i in order:
            seq, count, slot = seqs[i], num_tokens[i], slots[i]
            start_pos = seq.num_computed_tokens
            row = len(input_ids)
            input_ids.extend(seq.token_ids[start_pos : start_pos + count])
            span_positions = range(start_pos, start_pos + count)
            positions.extend(span_positions)
            blocks = seq.block_ids
            kv_slot_ids.extend(blocks[p // block_size] * block_size + p % block_size for p in span_positions)
            if count == 1:
                decode_rows.append(row)
                decode_tables.append(blocks)
                decode_lens.append(start_pos + 1)
            else:
                prefill_parts.append((row, count, start_pos, blocks))
            if start_pos + count == seq.num_tokens:
                sample_seq_ids.append(i)
                sample_rows.append(row + count - 1)
            if seg_slots and seg_slots[-1] == slot:
                seg_indptr[-1] += count
            else:
                seg_slots.append(slot)
                seg_indptr.append(seg_indptr[-1] + count)

        # Every integer list of the step goes through one preallocated host buffer per dtype and one copy
        # to the device; the tensors below are slices of it.
        max_blocks = max((len(t) for t in decode_tables), default=0)
        pad = [self.pad_block]
        flat_tables = [b for t in decode_tables for b in itertools.chain(t, pad * (max_blocks - len(t)))]
        ids, positions_t, kv_slots_t, decode_rows_t, tables_t, lens_t, rows_t, *block_ids = self._int64.pack(
            [input_ids, positions, kv_slot_ids, decode_rows, flat_tables, decode_lens, sample_rows]
            + [blocks for _, _, _, blocks in prefill_parts]
        )
        choice = kernels.kernel_choice()  # OPENLORA_KERNELS, read once per step
        use_triton = kernels.use_triton(device, choice)
        meta = StepMetadata(
            positions=positions_t,
            kv_slot_ids=kv_slots_t,
            prefills=[
                PrefillSpan(*part[:3], ids_) for part, ids_ in zip(prefill_parts, block_ids, strict=True)
            ],
            decode_rows=None,
            decode_block_tables=None,
            decode_context_lens=None,
            max_decode_context_len=0,
            use_triton=use_triton,
            lora=None,
        )
        native_attention = not use_triton and self._native_attention is not None and choice == "auto"
        if native_attention:
            meta.native_kv = self._native_attention.kv_slots(kv_slots_t)
        if decode_rows:
            num_decode = len(decode_rows)
            meta.decode_rows = decode_rows_t
            meta.decode_block_tables = tables_t.view(num_decode, max_blocks)
            meta.decode_context_lens = lens_t
            meta.max_decode_context_len = max(decode_lens)
            if native_attention:
                meta.native_decode = self._native_attention.decode_tables(meta.decode_block_tables, lens_t)
        used_slots = [s for s in seg_slots if s >= 0]
        if used_slots:
            seg_indptr_t, seg_slots_t = self._int32.pack([seg_indptr, seg_slots])
            longest = max(end - start for start, end in itertools.pairwise(seg_indptr))
            native = None
            if self.packs_slots or (not use_triton and self._native_sgmv is not None and choice == "auto"):
                native = NativeLora.plan(
                    seg_indptr,
                    seg_slots,
                    self.slot_ranks,
                    len(self.slot_ranks),
                    self._native_sgmv,
                    self.slot_formats,
                )
            # The reference path: a plan that loops over segments computes each at its own rank; a batched
            # one computes every row at the largest rank of its pass, so it runs in rank groups.
            plan = (
                None
                if use_triton or native is not None
                else kernels.plan_segments(seg_indptr, seg_slots, device, self.slot_ranks)
            )
            parts = ()
            if plan is not None and not plan.use_loop:
                parts = self._rank_parts(seg_indptr, seg_slots, used_slots, longest, device)
            meta.lora = LoraSegments(
                seg_indptr=seg_indptr_t,
                seg_slots=seg_slots_t,
                max_rank=max(self.slot_ranks[s] for s in used_slots),
                max_segment_rows=longest,
                use_triton=use_triton,
                # The reference runs the parts when there are several; the whole layout's plan only otherwise.
                plan=None if parts else plan,
                targets=frozenset().union(*(self.slot_targets[s] for s in set(used_slots))),
                parts=parts,
                native=native,
            )
        self._wait_for_slot_writes(used_slots)
        hidden = self.model(ids, meta)  # (T, hidden)
        self._record_slot_reads(used_slots)
        if not sample_rows:
            return [], hidden.new_empty(0, self.model.config.spec.vocab_size, dtype=torch.float32)
        return sample_seq_ids, self.model.compute_logits(hidden[rows_t])

    def _rank_parts(
        self,
        seg_indptr: list[int],
        seg_slots: list[int],
        used_slots: list[int],
        max_segment_rows: int,
        device: torch.device,
    ) -> tuple[LoraSegments, ...]:
        """The step's layout split by adapter rank, for the reference path (which computes every row at the
        largest rank of its pass): ranks are grouped from the largest down, a rank joining the group above
        while it is at least half that group's top (8 joins 16; 16 does not join 64). One group: () (the
        layout runs in one pass). Each part keeps every row, with the other groups' segments set to -1."""
        top_of = rank_groups(self.slot_ranks[s] for s in used_slots)
        tops = sorted(set(top_of.values()), reverse=True)
        if len(tops) == 1:
            return ()
        parts = []
        for top in tops:
            slots = [s if s >= 0 and top_of[self.slot_ranks[s]] == top else -1 for s in seg_slots]
            mine = [s for s in slots if s >= 0]
            parts.append(
                LoraSegments(
                    # Own tensors: the staging buffer holds the whole step's layout, packed once.
                    seg_indptr=torch.tensor(seg_indptr, dtype=torch.int32, device=device),
                    seg_slots=torch.tensor(slots, dtype=torch.int32, device=device),
                    max_rank=top,
                    max_segment_rows=max_segment_rows,
                    use_triton=False,
                    plan=kernels.plan_segments(seg_indptr, slots, device, self.slot_ranks),
                    targets=frozenset().union(*(self.slot_targets[s] for s in set(mine))),
                )
            )
        return tuple(parts)

    def _wait_for_slot_writes(self, slots: list[int]) -> None:
        """CUDA: the compute stream waits for the loads of these slots before reading them."""
        if self._load_stream is None:
            return
        compute = torch.cuda.current_stream(self.device)
        for slot in set(slots):
            written = self._slot_write_events[slot]
            if written is not None:
                compute.wait_event(written)
                self._slot_write_events[slot] = None

    def _record_slot_reads(self, slots: list[int]) -> None:
        """CUDA: marks the point of the compute stream after which these slots may be overwritten."""
        if self._load_stream is None or not slots:
            return
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        for slot in set(slots):
            self._slot_read_events[slot] = done
