"""The reference's decode strategies (slot-range view, gather) against a naive per-row loop."""

import pytest
import torch

from openlora_kernels import reference

TOLERANCE = {  # (atol, rtol) against the naive loop: only the order of float32 sums differs
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 1e-2),
}


def naive_shrink(x, lora_a, seg_indptr, seg_slots):
    u = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32)
    for row, slot in enumerate(torch.repeat_interleave(seg_slots, (seg_indptr[1:] - seg_indptr[:-1]).long())):
        if slot >= 0:
            u[row] = lora_a[slot].float() @ x[row].float()
    return u.to(x.dtype)


def naive_expand(u, lora_b, seg_indptr, seg_slots, y, scale):
    y = y.clone()
    for row, slot in enumerate(torch.repeat_interleave(seg_slots, (seg_indptr[1:] - seg_indptr[:-1]).long())):
        if slot >= 0:
            delta = scale[slot] * (lora_b[slot].float() @ u[row].float())
            y[row] = (y[row].float() + delta).to(y.dtype)
    return y


def one_row_segments(slots):
    seg_slots = torch.tensor(slots, dtype=torch.int32)
    seg_indptr = torch.arange(len(slots) + 1, dtype=torch.int32)
    return seg_indptr, seg_slots


def strategy(slots):
    """Which batched strategy the reference picks for one-row segments on these slots."""
    seg_indptr, seg_slots = one_row_segments(slots)
    plan = reference.SegmentPlan.from_tensors(seg_indptr, seg_slots)
    if plan.slot_range is None:
        return "gather"
    return "view" if plan.row_range is not None else "padded-view"


LAYOUTS = {
    # every row on its own slot, slots in order over a contiguous range: pure views
    "dense-range": [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14],
    # distinct slots with gaps in the range, out of order, some rows without an adapter
    "gappy-range": [5, -1, 2, 9, 3, 4, -1, 12, 6, 7, 8, 10, 11],
    # a dozen distinct slots scattered over a 32-slot pool (many adapters' decode): the range view, which
    # reads the unused slots between them at less cost than the gather's copies (slot_range_bench)
    "scattered-pool": [30, 2, 17, 9, 25, 11, 5, 28, 0, 21, 14, 7],
    # distinct slots spread too thin for the range view: gather
    "sparse": [0, 40, 13, 27, 35, 8, 21, 3, 30, 17],
    # a slot shared by two rows: gather
    "shared": [1, 2, 3, 4, 5, 6, 7, 8, 9, 9],
}


def test_each_decode_layout_takes_the_strategy_it_is_named_for():
    assert [strategy(slots) for slots in LAYOUTS.values()] == [
        "view",
        "padded-view",
        "padded-view",
        "gather",
        "gather",
    ]


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_decode_layouts_match_the_per_row_loop_and_leave_other_rows_alone(dtype, layout):
    gen = torch.Generator().manual_seed(len(layout))
    num_slots, rank, in_features, out_features = 48, 8, 40, 24
    seg_indptr, seg_slots = one_row_segments(LAYOUTS[layout])
    num_rows = len(LAYOUTS[layout])
    atol, rtol = TOLERANCE[dtype]
    x = torch.randn(num_rows, in_features, generator=gen).to(dtype)
    lora_a = (torch.randn(num_slots, rank, in_features, generator=gen) / in_features**0.5).to(dtype)
    lora_b = torch.randn(num_slots, out_features, rank, generator=gen).to(dtype)
    scale = torch.rand(num_slots, generator=gen) + 0.5

    u = reference.sgmv_shrink(x, lora_a, seg_indptr, seg_slots)
    torch.testing.assert_close(u, naive_shrink(x, lora_a, seg_indptr, seg_slots), atol=atol, rtol=rtol)
    y0 = torch.randn(num_rows, out_features, generator=gen).to(dtype)
    y = y0.clone()
    reference.sgmv_expand(u, lora_b, seg_indptr, seg_slots, y, scale)
    torch.testing.assert_close(
        y, naive_expand(u, lora_b, seg_indptr, seg_slots, y0, scale), atol=atol, rtol=rtol
    )
    no_adapter = seg_slots < 0
    assert torch.equal(y[no_adapter], y0[no_adapter])
    assert (u[no_adapter] == 0).all()


def test_range_view_ignores_unused_slots_inside_the_range():
    # Slots 1 and 3 are unused and hold NaN: a row must never read them.
    gen = torch.Generator().manual_seed(7)
    seg_indptr, seg_slots = one_row_segments([0, 2, 4, 5, 6, 7, 8, 9, 10, 11])
    x = torch.randn(10, 16, generator=gen)
    lora_a = torch.randn(12, 4, 16, generator=gen)
    lora_b = torch.randn(12, 8, 4, generator=gen)
    lora_a[[1, 3]] = float("nan")
    lora_b[[1, 3]] = float("nan")
    scale = torch.ones(12)
    u = reference.sgmv_shrink(x, lora_a, seg_indptr, seg_slots)
    y = torch.zeros(10, 8)
    reference.sgmv_expand(u, lora_b, seg_indptr, seg_slots, y, scale)
    assert torch.isfinite(u).all() and torch.isfinite(y).all()
    torch.testing.assert_close(u, naive_shrink(x, lora_a, seg_indptr, seg_slots), atol=1e-5, rtol=1e-5)


def test_rank_sliced_pool_views_give_the_same_result():
    # The engine passes pools sliced to the step's largest rank (non-contiguous views).
    gen = torch.Generator().manual_seed(11)
    seg_indptr, seg_slots = one_row_segments(list(range(16)))
    x = torch.randn(16, 32, generator=gen)
    lora_a = torch.randn(16, 12, 32, generator=gen)
    lora_b = torch.randn(16, 20, 12, generator=gen)
    scale = torch.rand(16, generator=gen)
    a_view, b_view = lora_a[:, :5], lora_b[:, :, :5]
    u = reference.sgmv_shrink(x, a_view, seg_indptr, seg_slots)
    torch.testing.assert_close(u, naive_shrink(x, a_view.contiguous(), seg_indptr, seg_slots))
    y = torch.zeros(16, 20)
    reference.sgmv_expand(u, b_view, seg_indptr, seg_slots, y, scale)
    expected = naive_expand(u, b_view.contiguous(), seg_indptr, seg_slots, torch.zeros(16, 20), scale)
    torch.testing.assert_close(y, expected)


def test_a_layout_changed_in_place_is_not_served_from_the_previous_plan():
    gen = torch.Generator().manual_seed(5)
    seg_indptr, seg_slots = one_row_segments(list(range(12)))
    x = torch.randn(12, 16, generator=gen)
    lora_a = torch.randn(24, 4, 16, generator=gen)
    first = reference.sgmv_shrink(x, lora_a, seg_indptr, seg_slots)
    torch.testing.assert_close(first, naive_shrink(x, lora_a, seg_indptr, seg_slots))
    seg_slots.copy_(torch.arange(23, 11, -1, dtype=torch.int32))
    second = reference.sgmv_shrink(x, lora_a, seg_indptr, seg_slots)
    torch.testing.assert_close(second, naive_shrink(x, lora_a, seg_indptr, seg_slots))


GROUPED = {  # short segments, each on its own slot (the engine's layouts): one batch entry per segment
    "grouped-range": ([2, 1, 3, 1, 2, 1, 1, 3, 2, 1], [0, 1, 2, 3, -1, 5, 6, 7, 8, 9]),
    "grouped-sparse": ([2, 1, 3, 1, 2, 1, 1, 3, 2, 1], [0, 40, 13, -1, 35, 8, 21, 3, 30, 17]),
}


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("layout", list(GROUPED))
def test_short_segments_on_their_own_slots_are_batched_per_segment(dtype, layout):
    lengths, slots = GROUPED[layout]
    seg_indptr = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    seg_slots = torch.tensor(slots, dtype=torch.int32)
    plan = reference.SegmentPlan.from_tensors(seg_indptr, seg_slots)
    assert not plan.use_loop and plan.entry_rows == 3
    assert (plan.slot_range is not None) == (layout == "grouped-range")
    gen = torch.Generator().manual_seed(len(layout))
    num_rows, num_slots = sum(lengths), 48
    x = torch.randn(num_rows, 24, generator=gen).to(dtype)
    lora_a = (torch.randn(num_slots, 8, 24, generator=gen) / 24**0.5).to(dtype)
    lora_b = torch.randn(num_slots, 16, 8, generator=gen).to(dtype)
    scale = torch.rand(num_slots, generator=gen)
    atol, rtol = TOLERANCE[dtype]
    u = reference.sgmv_shrink(x, lora_a, seg_indptr, seg_slots, plan=plan)
    torch.testing.assert_close(u, naive_shrink(x, lora_a, seg_indptr, seg_slots), atol=atol, rtol=rtol)
    y0 = torch.randn(num_rows, 16, generator=gen).to(dtype)
    y = y0.clone()
    reference.sgmv_expand(u, lora_b, seg_indptr, seg_slots, y, scale, plan=plan)
    expected = naive_expand(u, lora_b, seg_indptr, seg_slots, y0, scale)
    torch.testing.assert_close(y, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("with_ranks", [False, True], ids=["no-ranks", "ranks"])
def test_a_few_long_segments_among_many_short_ones_are_split_and_match_the_naive_loop(dtype, with_ranks):
    """Popular adapters' long segments looped, the long tail's one-row segments batched: the two passes
    together give each row exactly its own slot's LoRA (rows in neither part are left untouched)."""
    lengths = [8, 5, 5, *[1] * 18, 2, 3]
    gen = torch.Generator().manual_seed(11)
    num_slots, rank = 48, 8
    slots = torch.randperm(num_slots, generator=gen)[: len(lengths)].tolist()
    slots[4] = -1  # a row without an adapter
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    ranks = [int(r) for r in torch.randint(1, rank + 1, (num_slots,), generator=gen)] if with_ranks else None
    plan = reference.SegmentPlan(bounds, slots, torch.device("cpu"), ranks)
    assert plan.split is not None and not plan.use_loop
    long_part, short_part = plan.split
    assert long_part.use_loop and not short_part.use_loop
    seg_indptr = torch.tensor(bounds, dtype=torch.int32)
    seg_slots = torch.tensor(slots, dtype=torch.int32)
    lora_a = (torch.randn(num_slots, rank, 24, generator=gen) / 24**0.5).to(dtype)
    if with_ranks:  # columns past a slot's rank are zero padding, as the pools hold them
        for slot, r in enumerate(ranks):
            lora_a[slot, r:] = 0
    lora_b = torch.randn(num_slots, 16, rank, generator=gen).to(dtype)
    scale = torch.rand(num_slots, generator=gen)
    x = torch.randn(bounds[-1], 24, generator=gen).to(dtype)
    atol, rtol = TOLERANCE[dtype]
    u = reference.sgmv_shrink(x, lora_a, seg_indptr, seg_slots, plan=plan)
    torch.testing.assert_close(u, naive_shrink(x, lora_a, seg_indptr, seg_slots), atol=atol, rtol=rtol)
    y0 = torch.randn(bounds[-1], 16, generator=gen).to(dtype)
    y = y0.clone()
    reference.sgmv_expand(u, lora_b, seg_indptr, seg_slots, y, scale, plan=plan)
    expected = naive_expand(u, lora_b, seg_indptr, seg_slots, y0, scale)
    torch.testing.assert_close(y, expected, atol=atol, rtol=rtol)
