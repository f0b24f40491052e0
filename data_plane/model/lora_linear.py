"""LoRALinear: a projection (or several fused along the output) with preallocated per-slot LoRA pools,
applied through SGMV."""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

import openlora_kernels as kernels
from data_plane.model.dense import DenseMatmul
from data_plane.model.metadata import LoraSegments
from data_plane.model.quant.native import packed_view

if TYPE_CHECKING:
    from data_plane.model.quant.native import LoraPools, NativeKernels


class _Factors(NamedTuple):
    a: torch.Tensor
    b: torch.Tensor
    scale: float


class SlotWrites:
    """The copies, zero fills and scales of loading one slot, recorded once and applied as a few batched
    (foreach) calls. The record names each copy's source by its factor's key and holds the destination
    views, so a load of the same shapes into the same slot replays it: no view is made per load. Each
    torch call of a loader thread gives up the interpreter and waits to take it back from the engine
    thread, whose step on a GPU is nearly all Python; what a load costs there is the number of its calls,
    so a replay makes five."""

    def __init__(self) -> None:
        self.zero: list[torch.Tensor] = []
        self._dst: list[torch.Tensor] = []
        self._sources: list[tuple[Hashable, bool]] = []  # (factor key, True for B) of each destination
        self._scale_views: list[torch.Tensor] = []
        self._scale_keys: list[Hashable | None] = []  # None: the slice is left alone (scale 0)

    def copy(self, dst: torch.Tensor, key: Hashable, is_b: bool) -> None:
        self._dst.append(dst)
        self._sources.append((key, is_b))

    def scale(self, view: torch.Tensor, key: Hashable | None) -> None:
        self._scale_views.append(view)
        self._scale_keys.append(key)

    def apply(self, factors: Mapping[Hashable, Any]) -> None:
        """Writes `factors` (key -> an object with `a`, `b` and `scale`, as recorded) into the slot."""
        if self.zero:
            torch._foreach_zero_(self.zero)
        if self._dst:
            src = [factors[key].b if is_b else factors[key].a for key, is_b in self._sources]
            torch._foreach_copy_(self._dst, src)
        if self._scale_views:  # a 0-d view each: zeroed, then its scale added (exactly the scale)
            scales = [0.0 if key is None else float(factors[key].scale) for key in self._scale_keys]
            torch._foreach_zero_(self._scale_views)
            torch._foreach_add_(self._scale_views, scales)


class LoRALinear(nn.Module):
    """y = x @ W.T + b, plus for each output slice i: scale_i[s] * (x @ A_i[s].T) @ B_i[s].T on the rows of
    adapter slot s.

    `out_slices` fuses sub-projections that read the same input (q|k|v, gate|up): their weights (and
    biases) are stacked along the output, so the base is one GEMM; their A factors share one pool,
    interleaved by rank (pool row r * n + i is rank r of slice i), so one SGMV shrink serves all of them
    and leaving out the ranks no slot of the step uses is a view; each slice has its own B pool and scale
    and is expanded into its columns of y. A slice an adapter leaves alone has zero factors and scale 0.

    The pools are allocated once (`allocate_slots`); loading an adapter copies into a slot (`load_slot`),
    zero-padded beyond its rank; nothing is reallocated afterwards.
    """

    def __init__(self, in_features: int, out_slices: tuple[int, ...], bias: bool) -> None:
        super().__init__()
        self._init_slices(in_features, out_slices)
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(self.out_features), requires_grad=False) if bias else None
        self.dense_matmul: DenseMatmul = F.linear  # the model's choice (`dense.use_dense_matmul`)

    def _init_slices(self, in_features: int, out_slices: tuple[int, ...]) -> None:
        self.in_features = in_features
        self.out_slices = tuple(out_slices)
        self.out_features = sum(self.out_slices)
        offsets = [0, *itertools.accumulate(self.out_slices)]
        self.slice_bounds = list(itertools.pairwise(offsets))  # [(start, end)] columns of each slice
        # `_slices_for`'s answers, by the step's targets.
        self._slices_by_targets: dict[frozenset[str] | None, tuple[int, ...]] = {}
        self._slice_targets: tuple[str, ...] = ()
        self.max_rank = 0
        self.lora_a: torch.Tensor | None = None  # (S, R * n, in), rank-interleaved
        self.lora_b: list[torch.Tensor] = []  # per slice (S, out_i, R)
        self.lora_scale: torch.Tensor | None = None  # (n, S) float32; 0 where the slot leaves a slice alone
        self._native_pools: dict[tuple[int, ...], LoraPools] = {}  # by slices: checked once for the C code
        # (slot, slice, format) -> its A (R, in) and B (out_i, R) pool views in that element format and its
        # scale: made once, not per load.
        self._slot_views: dict[
            tuple[int, int, torch.dtype], tuple[torch.Tensor, torch.Tensor, torch.Tensor]
        ] = {}
        # The pools as 16-bit slots (`packed_pools`), by dtype.
        self._packed: dict[torch.dtype, tuple[torch.Tensor, list[torch.Tensor]]] = {}

    @property
    def slice_targets(self) -> tuple[str, ...]:
        """Each slice's PEFT target-module name (q_proj, ...), set by the model."""
        return self._slice_targets

    @slice_targets.setter
    def slice_targets(self, names: tuple[str, ...]) -> None:
        self._slice_targets = tuple(names)
        self._slices_by_targets.clear()

    @property
    def num_slices(self) -> int:
        return len(self.out_slices)

    def pool_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        """The dtype and device of the LoRA slot pools: the activations'."""
        return self.weight.dtype, self.weight.device

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, in) -> x @ W.T + b (T, out): the projection without LoRA."""
        return self.dense_matmul(x, self.weight, self.bias)

    def native_pools(self, kernels: NativeKernels, slices: tuple[int, ...]) -> LoraPools:
        """The pools of ``slices`` checked once for the native SGMV kernels, kept while the pools are these
        very tensors (a check per call costs more than a decode step's kernel on a small projection)."""
        pools = self._native_pools.get(slices)
        if pools is None or not pools.holds(self.lora_a, self.lora_b, self.lora_scale, slices):
            pools = kernels.lora_pools(
                self.lora_a, self.lora_b, self.lora_scale, slices, self.slice_bounds, self.out_features
            )
            self._native_pools[slices] = pools
        return pools

    def allocate_slots(self, num_slots: int, max_rank: int) -> None:
        dtype, device = self.pool_dtype_device()
        n = self.num_slices
        self.max_rank = max_rank
        self._native_pools.clear()
        self._slot_views.clear()
        self._packed.clear()
        self.lora_a = torch.zeros(num_slots, max_rank * n, self.in_features, dtype=dtype, device=device)
        # B (S, out_i, R). On the CPU outside Triton's interpreter its outputs are contiguous in memory (a
        # transposed view of (S, R, out_i)): the native expand adds each rank's row of outputs in one vector
        # pass, and the reference's batched matmuls read B in the layout they want (its matmuls give the
        # same floats from two rows up; a one-row product may round differently). Triton takes it contiguous.
        outputs_contiguous = device.type == "cpu" and not kernels.use_triton(device)
        self.lora_b = [
            torch.zeros(num_slots, max_rank, out, dtype=dtype, device=device).transpose(1, 2)
            if outputs_contiguous
            else torch.zeros(num_slots, out, max_rank, dtype=dtype, device=device)
            for out in self.out_slices
        ]
        self.lora_scale = torch.zeros(n, num_slots, dtype=torch.float32, device=device)

    def packed_pools(self, dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The A pool and each slice's B pool as slots of 16-bit `dtype` elements (float16 or bfloat16), in
        the pools' own memory (`quant.native.packed_view`): what a slot the native kernels read in that
        format holds. Made once per dtype."""
        packed = self._packed.get(dtype)
        if packed is None:
            assert self.lora_a is not None
            packed = self._packed[dtype] = (
                packed_view(self.lora_a, dtype),
                [packed_view(b, dtype) for b in self.lora_b],
            )
        return packed

    def slot_factors(self, slot: int, dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Slot `slot`'s A (R * n, in) and each slice's B (out_i, R) as held in format `dtype` (the pools'
        own dtype, or a 16-bit one the slot was loaded in), widened to float32 copies (for checks)."""
        assert self.lora_a is not None
        if dtype == self.lora_a.dtype:
            return self.lora_a[slot].clone(), [b[slot].clone() for b in self.lora_b]
        a, bs = self.packed_pools(dtype)
        return a[slot].float(), [b[slot].float() for b in bs]

    def load_slot(
        self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None, scale: float, index: int = 0
    ) -> None:
        """Copies A (r, in) and B (out_i, r) of slice `index` into `slot`; None leaves that slice without
        LoRA."""
        writes = SlotWrites()
        present = a is not None and b is not None
        self.slot_writes(writes, slot, "slice" if present else None, a.shape[0] if present else 0, index)
        writes.apply({"slice": _Factors(a, b, scale)} if present else {})

    def slot_writes(
        self,
        writes: SlotWrites,
        slot: int,
        key: Hashable | None,
        rank: int,
        index: int = 0,
        written_rank: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Records in `writes` what `load_slot` does: the A of factor `key` into the slot's first `rank`
        rank rows of slice `index`, its B into the first `rank` columns, the rest of the slot's ranks
        zeroed (scale 0 and zero factors when `key` is None). `written_rank`: the slot holds zeros from
        that rank on already (what its earlier loads wrote stops there), so only the ranks before it are
        zeroed (None: every rank). `dtype`: the element format the slot holds its factors in, the pools'
        own (None) or a 16-bit one (`packed_pools`), ranks counted in it."""
        assert self.lora_a is not None and self.lora_scale is not None
        dtype = self.lora_a.dtype if dtype is None else dtype
        views = self._slot_views.get((slot, index, dtype))
        if views is None:
            a_all, b_all = (
                (self.lora_a, self.lora_b) if dtype == self.lora_a.dtype else self.packed_pools(dtype)
            )
            a_pool = a_all[slot].view(self.max_rank, self.num_slices, self.in_features)[:, index]
            views = self._slot_views[(slot, index, dtype)] = (
                a_pool,
                b_all[index][slot],
                self.lora_scale[index, slot],
            )
        a_pool, b_pool, scale_view = views  # (R, in), (out_i, R), ()
        dirty = self.max_rank if written_rank is None else min(written_rank, self.max_rank)
        if key is None:
            if dirty > 0:
                writes.zero += [a_pool[:dirty], b_pool[:, :dirty]]
            writes.scale(scale_view, None)
            return
        writes.copy(a_pool[:rank], key, is_b=False)
        writes.copy(b_pool[:, :rank], key, is_b=True)
        if rank < dirty:
            writes.zero += [a_pool[rank:dirty], b_pool[:, rank:dirty]]
        writes.scale(scale_view, key)

    def forward(self, x: torch.Tensor, lora: LoraSegments | None) -> torch.Tensor:
        y = self.base_forward(x)  # (T, out)
        if lora is None or self.lora_a is None:
            return y
        for part in lora.parts or (lora,):
            self._add_lora(x, y, part)
        return y

    def _slices_for(self, targets: frozenset[str] | None) -> tuple[int, ...]:
        """The slices some adapter of a step adapting `targets` (PEFT module names; None: all) writes: the
        others hold zero factors, and their SGMV is left out. Kept per set of targets (a step's set is
        the same in every layer, and steps mostly repeat a few)."""
        slices = self._slices_by_targets.get(targets)
        if slices is None:
            slices = tuple(range(self.num_slices))
            if targets is not None and self.slice_targets:
                slices = tuple(i for i in slices if self.slice_targets[i] in targets)
            if len(self._slices_by_targets) >= 64:
                self._slices_by_targets.clear()
            self._slices_by_targets[targets] = slices
        return slices

    def _add_lora(self, x: torch.Tensor, y: torch.Tensor, lora: LoraSegments) -> None:
        """y (T, out) += the LoRA of `lora`'s segments, in place."""
        slices = self._slices_for(lora.targets)
        if not slices:
            return
        if lora.native is not None:
            pools = self.native_pools(lora.native.kernels, slices)
            lora.native.add(x, y, self.lora_a, self.lora_b, self.lora_scale, slices, self.slice_bounds, pools)
            return
        n, rank = self.num_slices, self.max_rank
        lora_a = self.lora_a
        if lora.max_rank < rank and not lora.use_triton:
            # The torch reference computes every pool column; ranks past the step's largest are zero
            # padding, so leave them out (views, no copy).
            rank = lora.max_rank
            lora_a = lora_a[:, : rank * n]
        layout = dict(max_segment_rows=lora.max_segment_rows, use_triton=lora.use_triton, plan=lora.plan)
        u = kernels.sgmv_shrink(x, lora_a, lora.seg_indptr, lora.seg_slots, **layout, rank_columns=n)
        # u (T, rank * n)
        if n > 1:
            u = u.view(-1, rank, n).transpose(1, 2).contiguous()  # (T, n, rank): each slice's ranks in a row
        for i in slices:
            start, end = self.slice_bounds[i]
            lora_b = self.lora_b[i] if rank == self.max_rank else self.lora_b[i][:, :, :rank]
            if lora.use_triton and not lora_b.is_contiguous():
                # Triton's interpreter on pools laid out for the CPU kernels (see allocate_slots): a copy.
                lora_b = lora_b.contiguous()
            u_i = u if n == 1 else u[:, i]  # (T, rank)
            y_i = y if n == 1 else y[:, start:end]  # (T, out_i), a view: expand adds in place
            kernels.sgmv_expand(
                u_i, lora_b, lora.seg_indptr, lora.seg_slots, y_i, self.lora_scale[i], **layout
            )
