"""The pure-torch reference against a naive per-row loop, and the public dispatch."""

import pytest
import torch

import openlora_kernels as kernels
from openlora_kernels import reference


def naive_shrink(x, lora_a, seg_indptr, seg_slots):
    u = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32)
    bounds, slots = seg_indptr.tolist(), seg_slots.tolist()
    for g, slot in enumerate(slots):
        for row in range(bounds[g], bounds[g + 1]):
            if slot >= 0:
                u[row] = lora_a[slot].float() @ x[row].float()
    return u.to(x.dtype)


def naive_expand(u, lora_b, seg_indptr, seg_slots, y, scale):
    y = y.clone()
    bounds, slots = seg_indptr.tolist(), seg_slots.tolist()
    for g, slot in enumerate(slots):
        for row in range(bounds[g], bounds[g + 1]):
            if slot >= 0:
                delta = scale[slot] * (lora_b[slot].float() @ u[row].float())
                y[row] = (y[row].float() + delta).to(y.dtype)
    return y


def random_layout(gen, num_rows, num_segments, num_slots, with_none):
    cuts = torch.randint(0, num_rows + 1, (num_segments - 1,), generator=gen).sort().values
    seg_indptr = torch.cat([torch.tensor([0]), cuts, torch.tensor([num_rows])]).to(torch.int32)
    seg_slots = torch.randint(0, num_slots, (num_segments,), generator=gen, dtype=torch.int32)
    if with_none:
        seg_slots[::3] = -1
    return seg_indptr, seg_slots


TOLERANCE = {  # (atol, rtol) against the naive loop: only the order of float32 sums differs
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 1e-2),
}


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize(
    ("num_rows", "num_segments"),
    [(40, 40), (40, 30), (200, 4), (64, 16), (5, 12)],
    ids=["decode", "decode-with-empty", "prefill", "mixed", "many-empty"],
)
@pytest.mark.parametrize("with_none", [False, True], ids=["all-adapters", "with-none"])
def test_reference_matches_per_row_loop(dtype, num_rows, num_segments, with_none):
    gen = torch.Generator().manual_seed(num_rows * 1000 + num_segments + with_none)
    num_slots, rank, in_features, out_features = 7, 16, 72, 56
    seg_indptr, seg_slots = random_layout(gen, num_rows, num_segments, num_slots, with_none)
    x = torch.randn(num_rows, in_features, generator=gen).to(dtype)
    lora_a = (torch.randn(num_slots, rank, in_features, generator=gen) / in_features**0.5).to(dtype)
    lora_b = torch.randn(num_slots, out_features, rank, generator=gen).to(dtype)
    scale = torch.rand(num_slots, generator=gen) + 0.5
    y0 = torch.randn(num_rows, out_features, generator=gen).to(dtype)
    atol, rtol = TOLERANCE[dtype]

    u = reference.sgmv_shrink(x, lora_a, seg_indptr, seg_slots)
    assert u.dtype == dtype and u.shape == (num_rows, rank)
    torch.testing.assert_close(u, naive_shrink(x, lora_a, seg_indptr, seg_slots), atol=atol, rtol=rtol)

    y = y0.clone()
    reference.sgmv_expand(u, lora_b, seg_indptr, seg_slots, y, scale)
    torch.testing.assert_close(
        y, naive_expand(u, lora_b, seg_indptr, seg_slots, y0, scale), atol=atol, rtol=rtol
    )
    row_slots = torch.repeat_interleave(seg_slots, (seg_indptr[1:] - seg_indptr[:-1]).long())
    assert torch.equal(y[row_slots < 0], y0[row_slots < 0])  # no adapter: bit for bit untouched
    assert (u[row_slots < 0] == 0).all()


def test_reference_gather_path_bounds_memory_and_stays_exact(monkeypatch):
    # A tiny budget forces the decode strategy to work in many row chunks.
    monkeypatch.setattr(reference, "_GATHER_BUDGET_BYTES", 1)
    gen = torch.Generator().manual_seed(3)
    seg_indptr, seg_slots = random_layout(gen, 33, 33, 5, with_none=True)
    x = torch.randn(33, 40, generator=gen)
    lora_a = torch.randn(5, 8, 40, generator=gen)
    lora_b = torch.randn(5, 24, 8, generator=gen)
    scale = torch.rand(5, generator=gen)
    u = reference.sgmv_shrink(x, lora_a, seg_indptr, seg_slots)
    torch.testing.assert_close(u, naive_shrink(x, lora_a, seg_indptr, seg_slots), atol=1e-5, rtol=1e-5)
    y0 = torch.randn(33, 24, generator=gen)
    y = y0.clone()
    reference.sgmv_expand(u, lora_b, seg_indptr, seg_slots, y, scale)
    torch.testing.assert_close(
        y, naive_expand(u, lora_b, seg_indptr, seg_slots, y0, scale), atol=1e-5, rtol=1e-5
    )


def test_cpu_tensors_use_the_reference_unless_triton_is_forced(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("OPENLORA_KERNELS", raising=False)
    assert not kernels.use_triton(cpu)
    assert kernels.use_triton(torch.device("cuda"))
    monkeypatch.setenv("OPENLORA_KERNELS", "triton")
    assert kernels.use_triton(cpu)
    monkeypatch.setenv("OPENLORA_KERNELS", "reference")
    assert not kernels.use_triton(torch.device("cuda"))


def test_unknown_kernel_choice_is_refused(monkeypatch):
    monkeypatch.setenv("OPENLORA_KERNELS", "cuda-graphs")
    with pytest.raises(ValueError, match="OPENLORA_KERNELS"):
        kernels.use_triton(torch.device("cpu"))


def test_an_explicit_kernel_choice_is_not_read_from_the_environment(monkeypatch):
    gen = torch.Generator().manual_seed(9)
    seg_indptr, seg_slots = random_layout(gen, 12, 4, 3, with_none=True)
    x = torch.randn(12, 16, generator=gen)
    lora_a = torch.randn(3, 4, 16, generator=gen)
    monkeypatch.setenv("OPENLORA_KERNELS", "not-a-kernel")
    with pytest.raises(ValueError, match="OPENLORA_KERNELS"):
        kernels.sgmv_shrink(x, lora_a, seg_indptr, seg_slots)
    u = kernels.sgmv_shrink(x, lora_a, seg_indptr, seg_slots, use_triton=False)
    torch.testing.assert_close(u, naive_shrink(x, lora_a, seg_indptr, seg_slots))


@pytest.mark.parametrize("num_segments", [3, 24], ids=["segment-loop", "batched"])
def test_a_plan_built_from_host_lists_gives_the_same_result_as_one_read_from_tensors(num_segments):
    gen = torch.Generator().manual_seed(num_segments)
    seg_indptr, seg_slots = random_layout(gen, 24, num_segments, 5, with_none=True)
    plan = kernels.plan_segments(seg_indptr.tolist(), seg_slots.tolist(), torch.device("cpu"))
    x = torch.randn(24, 20, generator=gen)
    lora_a = torch.randn(5, 6, 20, generator=gen)
    lora_b = torch.randn(5, 12, 6, generator=gen)
    scale = torch.rand(5, generator=gen)
    u = kernels.sgmv_shrink(x, lora_a, seg_indptr, seg_slots, use_triton=False, plan=plan)
    torch.testing.assert_close(u, naive_shrink(x, lora_a, seg_indptr, seg_slots))
    y0 = torch.randn(24, 12, generator=gen)
    y = y0.clone()
    kernels.sgmv_expand(u, lora_b, seg_indptr, seg_slots, y, scale, use_triton=False, plan=plan)
    torch.testing.assert_close(y, naive_expand(u, lora_b, seg_indptr, seg_slots, y0, scale))
