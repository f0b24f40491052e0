"""The reference's segment loop computes each segment at its own slot's rank when the plan knows the ranks
(a decode step mixing ranks 8, 16 and 64, as engine_bench's skewed case does)."""

import torch

from openlora_kernels import reference


def layout(lengths, slots):
    seg_indptr = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return seg_indptr, torch.tensor(slots, dtype=torch.int32)


def test_a_popular_adapters_long_segment_among_one_row_segments_takes_the_segment_loop():
    lengths = [6, 1, 3, 1, 1, 1, 2, 1, 1, 1, 1, 1]
    seg_indptr, seg_slots = layout(lengths, list(range(2, 14)))
    assert reference.SegmentPlan.from_tensors(seg_indptr, seg_slots).use_loop
    # The same rows on one slot each stay batched.
    seg_indptr, seg_slots = layout([1] * 20, list(range(2, 22)))
    assert not reference.SegmentPlan.from_tensors(seg_indptr, seg_slots).use_loop


def test_the_segment_loop_reads_only_the_columns_each_slots_rank_fills():
    gen = torch.Generator().manual_seed(5)
    num_slots, max_rank, n, h_in, h_out = 6, 8, 2, 24, 16  # n: slices of a fused group (rank-interleaved A)
    slot_ranks = [8, 2, 4, 8, 1, 4]
    lengths, slots = [6, 1, 3, 1, 1, 1, 2, 1, 1], [0, 1, 2, 3, 4, 5, -1, 2, 1]
    seg_indptr, seg_slots = layout(lengths, slots)
    num_rows = sum(lengths)
    # Garbage past each slot's rank: a plan with ranks must not read it.
    lora_a = torch.randn(num_slots, max_rank * n, h_in, generator=gen)
    lora_b = torch.randn(num_slots, h_out, max_rank, generator=gen)
    truncated_a, truncated_b = lora_a.clone(), lora_b.clone()
    for slot, rank in enumerate(slot_ranks):
        truncated_a[slot, rank * n :] = 0
        truncated_b[slot, :, rank:] = 0
    x = torch.randn(num_rows, h_in, generator=gen)
    scale = torch.rand(num_slots, generator=gen)
    plan = reference.SegmentPlan(seg_indptr.tolist(), seg_slots.tolist(), torch.device("cpu"), slot_ranks)
    assert plan.use_loop
    u = reference.sgmv_shrink(x, lora_a, seg_indptr, seg_slots, plan=plan, rank_columns=n)
    expected_u = reference.sgmv_shrink(x, truncated_a, seg_indptr, seg_slots)
    torch.testing.assert_close(u, expected_u, atol=1e-5, rtol=1e-5)
    u_slice = u.view(num_rows, max_rank, n)[:, :, 1].contiguous()  # (T, R): slice 1's ranks
    y0 = torch.randn(num_rows, h_out, generator=gen)
    y, expected_y = y0.clone(), y0.clone()
    reference.sgmv_expand(u_slice, lora_b, seg_indptr, seg_slots, y, scale, plan=plan)
    reference.sgmv_expand(u_slice, truncated_b, seg_indptr, seg_slots, expected_y, scale)
    torch.testing.assert_close(y, expected_y, atol=1e-5, rtol=1e-5)
    assert torch.equal(y[13:15], y0[13:15])  # the rows without an adapter are untouched
