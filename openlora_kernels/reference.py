"""Pure-torch SGMV shrink/expand: the ground truth for the Triton kernels and the CPU engine's path.

A batch of T rows is cut into G contiguous segments; segment g covers rows
``seg_indptr[g]:seg_indptr[g + 1]`` and uses adapter slot ``seg_slots[g]`` (-1: no adapter).

Strategies, chosen once per layout (``SegmentPlan``), with identical results:
- segments of several rows (prefill, few adapters, or a popular adapter's rows together in a decode
  step): one matmul per segment, over only the pool columns its slot's rank fills when the plan knows
  the slots' ranks (``slot_ranks``), so a step mixing ranks 8 and 64 reads and computes each adapter at
  its own rank;
- many short segments: one batched matmul over "entries", each one slot's rows padded to the longest
  entry. When every segment has its own slot (the engine's layouts: rows grouped by slot) and none is
  longer than ``_MAX_ENTRY_ROWS``, an entry is a segment, so a popular adapter's rows share one read of
  its weights; otherwise an entry is one row (layouts not grouped by slot).
  - entries on distinct slots from a narrow slot range: the batch is the pool's slot range itself (a
    view: no weight is copied); slots of the range no row uses get zero rows;
  - otherwise: each entry's slot weights are gathered, in entry chunks so the copy stays under
    ``_GATHER_BUDGET_BYTES``.
The batched matmuls put the rows on the left, ``(E, m, H_in) @ (E, H_in, R)`` with the pool transposed
as a view: on CPU this runs 5-10x faster than ``(E, R, H_in) @ (E, H_in, m)``.
Measured on CPU (2 cores; 32 one-row segments on 32 distinct slots, R=16, H_in=H_out=512, shrink +
expand): 370 us gather + bmm(A, x), 190 us slot-range view, versus 120 us for the base layer's linear.
Half-precision inputs are computed in float32 and rounded once at the end.
"""

from __future__ import annotations

import itertools

import torch

# Segment loop up to this many segments whatever their length; above it, a batched matmul when segments
# average fewer than _MIN_LOOP_ROWS_PER_SEGMENT rows.
_MAX_LOOP_SEGMENTS = 8
_MIN_LOOP_ROWS_PER_SEGMENT = 2
# A batch entry is a whole segment while no segment is longer than this (padding every entry to the
# longest); past it, one row per entry.
_MAX_ENTRY_ROWS = 4
# The slot-range view reads every slot of the range; it is chosen while the range holds at most this
# many slots per entry that uses it (the gather reads each entry's weights twice and writes them once,
# in more ops). `python -m benchmarks.slot_range_bench` (2026-12-01, 2-core AVX2 CPU, 1 thread): the view
# took 0.80-0.41x the gather's time at up to 3.6 slots per entry, about the same at 5-6, 2.6-2.9x at 12.
# With 2 the usual many-adapter decode step (a dozen rows on distinct slots scattered over a 32-slot pool)
# took the gather: 1.5x the step time of the same rows on one adapter, against 1.2x with the view.
_MAX_RANGE_SLOTS_PER_ROW = 4
# Upper bound on the gathered per-entry weight copy of the gather strategy.
_GATHER_BUDGET_BYTES = 64 * 1024 * 1024
# A layout the segment loop would run, with a few long segments and at least this many short ones (at
# most _MAX_ENTRY_ROWS rows), is split in two: the long segments looped, the short ones batched
# (`python -m benchmarks.slot_range_bench --split`, 2026-12-01, 2-core AVX2 CPU, 1 thread, two runs:
# 0.41-0.80x the loop's time with 18 short segments, 0.42-0.47x with 27, 0.97x with 16, 1.04-1.21x with
# 10).
_MIN_SPLIT_SHORT_SEGMENTS = 16


def _segments(bounds: list[int], slots: list[int]) -> list[tuple[int, int, int]]:
    """(start, end, slot) of every non-empty segment with an adapter."""
    return [
        (bounds[g], bounds[g + 1], slots[g])
        for g in range(len(slots))
        if slots[g] >= 0 and bounds[g + 1] > bounds[g]
    ]


def _split(
    seg_bounds: list[int],
    seg_slots: list[int],
    segments: list[tuple[int, int, int]],
    device: torch.device,
    slot_ranks: list[int] | None,
) -> tuple[SegmentPlan, SegmentPlan] | None:
    """The (long, short) split of a looped layout with at least _MIN_SPLIT_SHORT_SEGMENTS short segments
    and a batched plan for them; None otherwise."""
    short = [(start, end, slot) for start, end, slot in segments if end - start <= _MAX_ENTRY_ROWS]
    if len(short) < _MIN_SPLIT_SHORT_SEGMENTS or len(short) == len(segments):
        return None
    lengths = [end - start for start, end in itertools.pairwise(seg_bounds)]
    short_slots = [s if n <= _MAX_ENTRY_ROWS else -1 for s, n in zip(seg_slots, lengths, strict=True)]
    short_plan = SegmentPlan(seg_bounds, short_slots, device, slot_ranks)
    if short_plan.use_loop:
        return None
    long_slots = [s if n > _MAX_ENTRY_ROWS else -1 for s, n in zip(seg_slots, lengths, strict=True)]
    return SegmentPlan(seg_bounds, long_slots, device, slot_ranks), short_plan


def _use_segment_loop(segments: list[tuple[int, int, int]]) -> bool:
    if len(segments) <= _MAX_LOOP_SEGMENTS:
        return True
    num_rows = sum(end - start for start, end, _ in segments)
    if num_rows >= _MIN_LOOP_ROWS_PER_SEGMENT * len(segments):
        return True
    # Segments on distinct slots but one too long to pad every entry to: batching one row per entry
    # would copy a popular adapter's weights once per row; a matmul per segment reads them once.
    slots = [slot for _, _, slot in segments]
    longest = max(end - start for start, end, _ in segments)
    return longest > _MAX_ENTRY_ROWS and len(set(slots)) == len(slots)


class SegmentPlan:
    """The host-side plan of one segment layout: which strategy, and where each row goes.

    Built from the layout's host values (``seg_bounds`` = seg_indptr (G+1,), ``seg_slots`` (G,)), once
    per step by the engine and passed to every projection's shrink and expand (``from_tensors`` reads a
    layout back from tensors, for callers without one).

    ``segments``: (start, end, slot) of the segments with an adapter; ``segment_ranks`` the rank of each
    one's slot, from ``slot_ranks`` (indexed by slot) when given, else None (every pool column is
    computed; those past a slot's rank are zero padding either way). Unless ``use_loop``, rows are
    batched in ``num_entries`` entries of ``entry_rows`` rows each (see the module docstring):
    ``rows`` / ``slots`` (n,) int64 are the row index and slot of each row with an adapter, in segment
    order, and ``flat`` (n,) int64 its place ``entry * entry_rows + offset`` in the padded batch. With
    ``slot_range`` (lo, hi) set, entry ``slot - lo`` of the pool view ``[lo, hi)`` is used; otherwise
    entry e uses slot ``entry_slots[e]`` and holds rows ``entry_bounds[e]:entry_bounds[e + 1]`` of
    ``rows``. ``row_range`` is set when every entry is one row and those rows are one contiguous range in
    slot order over every slot of the range, so inputs and outputs are views as well (the usual decode
    step).
    """

    def __init__(
        self,
        seg_bounds: list[int],
        seg_slots: list[int],
        device: torch.device,
        slot_ranks: list[int] | None = None,
    ) -> None:
        self.segments = _segments(seg_bounds, seg_slots)
        self.segment_ranks = None if slot_ranks is None else [slot_ranks[s] for _, _, s in self.segments]
        self.use_loop = _use_segment_loop(self.segments)
        self.slot_range: tuple[int, int] | None = None
        self.row_range: tuple[int, int] | None = None
        # (long segments' plan, short segments' plan), each the whole layout with the other's segments
        # set to -1: the shrink and expand run both (their rows are disjoint). None: this plan alone.
        self.split: tuple[SegmentPlan, SegmentPlan] | None = None
        if self.use_loop:
            self.split = _split(seg_bounds, seg_slots, self.segments, device, slot_ranks)
            if self.split is not None:
                self.use_loop = False  # batched in part: the caller may still split by rank
            return
        seg_slot_list = [slot for _, _, slot in self.segments]
        longest = max(end - start for start, end, _ in self.segments)
        if longest <= _MAX_ENTRY_ROWS and len(set(seg_slot_list)) == len(seg_slot_list):
            entries = self.segments  # one entry per segment
        else:
            entries = [
                (row, row + 1, slot) for start, end, slot in self.segments for row in range(start, end)
            ]
            longest = 1
        self.entry_rows = longest
        rows: list[int] = []
        slots: list[int] = []
        offsets: list[int] = []
        entry_bounds = [0]
        for start, end, slot in entries:
            rows.extend(range(start, end))
            slots.extend([slot] * (end - start))
            offsets.extend(range(end - start))
            entry_bounds.append(len(rows))
        self.num_rows = len(rows)
        self.entry_slots = [slot for _, _, slot in entries]
        self.entry_slot_ids = torch.tensor(self.entry_slots, dtype=torch.int64, device=device)  # (E,)
        self.entry_bounds = entry_bounds
        lo, hi = min(slots), max(slots) + 1
        distinct = len(set(self.entry_slots)) == len(entries)
        if distinct and hi - lo <= _MAX_RANGE_SLOTS_PER_ROW * len(entries):
            self.slot_range = (lo, hi)
            self.num_entries = hi - lo
            entry_index = [slot - lo for slot in slots]
            if (
                longest == 1
                and rows == list(range(rows[0], rows[0] + len(rows)))
                and slots == list(range(lo, hi))
            ):
                self.row_range = (rows[0], rows[0] + len(rows))
        else:
            self.num_entries = len(entries)
            entry_index = [
                e for e in range(len(entries)) for _ in range(entry_bounds[e + 1] - entry_bounds[e])
            ]
        self.rows = torch.tensor(rows, dtype=torch.int64, device=device)  # (n,)
        self.slots = torch.tensor(slots, dtype=torch.int64, device=device)  # (n,)
        flat = [e * longest + offset for e, offset in zip(entry_index, offsets, strict=True)]
        self.flat = torch.tensor(flat, dtype=torch.int64, device=device)  # (n,)

    @classmethod
    def from_tensors(cls, seg_indptr: torch.Tensor, seg_slots: torch.Tensor) -> SegmentPlan:
        """The plan of a layout held in tensors (reads them back to the host)."""
        return cls(seg_indptr.tolist(), seg_slots.tolist(), seg_indptr.device)

    def segment_columns(self, num_columns: int, rank_columns: int) -> list[int]:
        """Per segment, the pool columns (of ``num_columns``) its slot's rank fills: ``rank_columns`` per
        unit of rank (a fused group's rank-interleaved A has one per slice), all without ranks."""
        if self.segment_ranks is None:
            return [num_columns] * len(self.segments)
        return [min(num_columns, rank * rank_columns) for rank in self.segment_ranks]

    def entry_chunks(self, bytes_per_entry: int):
        """(first entry, end entry, rows slice of ``rows``) chunks whose gathered weights stay under the
        budget (gather strategy)."""
        step = max(1, _GATHER_BUDGET_BYTES // max(1, bytes_per_entry))
        for first in range(0, len(self.entry_slots), step):
            end = min(first + step, len(self.entry_slots))
            yield first, end, slice(self.entry_bounds[first], self.entry_bounds[end])


def _row_dots(x: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
    """x (n, H_in), lora_a (n, R, H_in) -> (n, R) float32: row i against its own slot's A.

    A batched dot product rather than a bmm of (n, 1, H_in) @ (n, H_in, R): with one row per slot the
    shrink is a matrix-vector product per slot, which bmm runs about 1.4x slower on CPU (measured at the
    engine's shapes, pools not in cache)."""
    return torch.linalg.vecdot(_f32(lora_a), _f32(x).unsqueeze(1))


def _f32(t: torch.Tensor) -> torch.Tensor:
    """t in float32 (itself when it already is: no dispatch for the no-op cast)."""
    return t if t.dtype == torch.float32 else t.float()


def _plan(plan: SegmentPlan | None, seg_indptr: torch.Tensor, seg_slots: torch.Tensor) -> SegmentPlan:
    return SegmentPlan.from_tensors(seg_indptr, seg_slots) if plan is None else plan


def _to_entries(
    layout: SegmentPlan, values: torch.Tensor, rows: torch.Tensor, flat: torch.Tensor, num_entries: int
) -> torch.Tensor:
    """values[rows] (n, D) -> (num_entries, entry_rows, D) float32 at their ``flat`` places, zeros
    elsewhere."""
    m = layout.entry_rows
    batch = values.new_zeros(num_entries * m, values.shape[1], dtype=torch.float32)
    batch[flat] = values[rows].float()
    return batch.view(num_entries, m, -1)


def sgmv_shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    seg_indptr: torch.Tensor,
    seg_slots: torch.Tensor,
    slot_ranks: torch.Tensor | None = None,
    *,
    max_segment_rows: int | None = None,
    plan: SegmentPlan | None = None,
    rank_columns: int = 1,
) -> torch.Tensor:
    """u = x @ A[slot].T per segment.

    x (T, H_in), lora_a (S, R, H_in), seg_indptr (G+1,) int, seg_slots (G,) int in [-1, S).
    Returns u (T, R) in x's dtype; rows of slot -1 are zero. ``slot_ranks`` is ignored: columns past a
    slot's rank are zero padding in ``lora_a`` and give zeros here as well.
    ``max_segment_rows`` (a hint for the Triton path) is ignored. ``plan``: the layout's
    ``SegmentPlan`` when the caller built it (else built here); when it knows the slots' ranks, the
    segment loop reads only the first ``rank * rank_columns`` rows of each slot's A (the rest are zero
    padding) and leaves those columns of u zero.
    """
    num_rows, rank = x.shape[0], lora_a.shape[1]
    layout = _plan(plan, seg_indptr, seg_slots)
    if layout.split is not None:  # disjoint rows: the sum is each part's rows as computed
        long_part, short_part = layout.split
        u = sgmv_shrink(x, lora_a, seg_indptr, seg_slots, plan=long_part, rank_columns=rank_columns)
        return u.add_(
            sgmv_shrink(x, lora_a, seg_indptr, seg_slots, plan=short_part, rank_columns=rank_columns)
        )
    if layout.row_range == (0, num_rows):  # every row, each on the next slot: no copy in or out
        lo, hi = layout.slot_range
        return _row_dots(x, lora_a[lo:hi]).to(x.dtype)
    u = torch.zeros(num_rows, rank, dtype=torch.float32, device=x.device)  # (T, R)
    if layout.use_loop:
        columns = layout.segment_columns(rank, rank_columns)
        for (start, end, slot), k in zip(layout.segments, columns, strict=True):
            u[start:end, :k] = _f32(x[start:end]) @ _f32(lora_a[slot, :k]).T  # (n, H_in) @ (H_in, k)
        return u.to(x.dtype)
    if layout.row_range is not None:
        (r0, r1), (lo, hi) = layout.row_range, layout.slot_range
        u[r0:r1] = _row_dots(x[r0:r1], lora_a[lo:hi])
        return u.to(x.dtype)
    if layout.slot_range is not None:
        lo, hi = layout.slot_range
        xs = _to_entries(layout, x, layout.rows, layout.flat, hi - lo)  # (hi - lo, m, H_in)
        us = torch.bmm(xs, lora_a[lo:hi].float().transpose(1, 2))  # (hi - lo, m, R)
        u[layout.rows] = us.view(-1, rank)[layout.flat]
        return u.to(x.dtype)
    for first, end, chunk in layout.entry_chunks(rank * lora_a.shape[2] * 4):
        rows, flat = layout.rows[chunk], layout.flat[chunk] - first * layout.entry_rows
        a = lora_a[layout.entry_slot_ids[first:end]].float()  # (e, R, H_in), a copy
        us = torch.bmm(_to_entries(layout, x, rows, flat, end - first), a.transpose(1, 2))  # (e, m, R)
        u[rows] = us.view(-1, rank)[flat]
    return u.to(x.dtype)


def _add_rows(y: torch.Tensor, rows: torch.Tensor | slice, delta: torch.Tensor) -> None:
    """y[rows] += delta (float32), summed in float32 and rounded to y's dtype once."""
    if y.dtype == torch.float32 and isinstance(rows, slice):
        y[rows].add_(delta)  # in place through the view
    else:
        y[rows] = (y[rows].float() + delta).to(y.dtype)


def sgmv_expand(
    u: torch.Tensor,
    lora_b: torch.Tensor,
    seg_indptr: torch.Tensor,
    seg_slots: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    slot_ranks: torch.Tensor | None = None,
    *,
    max_segment_rows: int | None = None,
    plan: SegmentPlan | None = None,
    rank_columns: int = 1,
) -> None:
    """y[rows] += scale[slot] * u[rows] @ B[slot].T per segment, in place.

    u (T, R), lora_b (S, H_out, R), y (T, H_out), scale (S,) float32. Rows of slot -1 are untouched.
    The sum is formed in float32 and rounded to y's dtype once. ``slot_ranks`` and ``max_segment_rows``
    are ignored; ``plan`` and ``rank_columns`` as for ``sgmv_shrink`` (columns of u and B).
    """
    out_features, rank = lora_b.shape[1], lora_b.shape[2]
    layout = _plan(plan, seg_indptr, seg_slots)
    if layout.split is not None:
        for part in layout.split:
            sgmv_expand(u, lora_b, seg_indptr, seg_slots, y, scale, plan=part, rank_columns=rank_columns)
        return
    if layout.use_loop:
        scales = scale.tolist()
        columns = layout.segment_columns(rank, rank_columns)
        for (start, end, slot), k in zip(layout.segments, columns, strict=True):
            if y.dtype == torch.float32:  # y += scale * u @ B.T in one call, in place through the view
                y[start:end].addmm_(_f32(u[start:end, :k]), _f32(lora_b[slot, :, :k]).T, alpha=scales[slot])
                continue
            delta = u[start:end, :k].float() @ lora_b[slot, :, :k].float().T  # (n, k) @ (k, H_out)
            y[start:end] = (y[start:end].float() + scales[slot] * delta).to(y.dtype)
        return
    if layout.row_range is not None and y.dtype == torch.float32:
        # Rows r0:r1 use slots lo:hi in order: accumulate straight into y, scale folded into u (R wide).
        (r0, r1), (lo, hi) = layout.row_range, layout.slot_range
        us = (u[r0:r1].float() * scale[lo:hi].float().unsqueeze(1)).unsqueeze(1)  # (n, 1, R)
        y[r0:r1].unsqueeze(1).baddbmm_(us, lora_b[lo:hi].float().transpose(1, 2))  # (n, 1, H_out) += ...
        return
    if layout.row_range is not None:
        (r0, r1), (lo, hi) = layout.row_range, layout.slot_range
        deltas = torch.bmm(u[r0:r1].float().unsqueeze(1), lora_b[lo:hi].float().transpose(1, 2)).squeeze(1)
        deltas *= scale[lo:hi].float().unsqueeze(1)  # (n, H_out)
        _add_rows(y, slice(r0, r1), deltas)
        return
    if layout.slot_range is not None:
        lo, hi = layout.slot_range
        us = _to_entries(layout, u, layout.rows, layout.flat, hi - lo)  # (hi - lo, m, R)
        deltas = torch.bmm(us, lora_b[lo:hi].float().transpose(1, 2)).view(-1, out_features)[layout.flat]
        deltas *= scale[layout.slots].float().unsqueeze(1)  # (n, H_out)
        _add_rows(y, layout.rows, deltas)
        return
    for first, end, chunk in layout.entry_chunks(out_features * rank * 4):
        rows, flat = layout.rows[chunk], layout.flat[chunk] - first * layout.entry_rows
        b = lora_b[layout.entry_slot_ids[first:end]].float()  # (e, H_out, R), a copy
        us = _to_entries(layout, u, rows, flat, end - first)  # (e, m, R)
        deltas = torch.bmm(us, b.transpose(1, 2)).view(-1, out_features)[flat]  # (n, H_out)
        deltas *= scale[layout.slots[chunk]].float().unsqueeze(1)
        _add_rows(y, rows, deltas)
