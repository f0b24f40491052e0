"""Triton SGMV kernels against the pure-torch reference (on the CPU through the Triton interpreter).

Grid: dtype x H_in/H_out (one pair not a multiple of any block) x rank (1, 8, 16, 64, mixed per slot)
x popularity (distinct, uniform, skewed, identical) x slot -1 present or not. Inputs are fresh random
values per case, never zeros; shrink writes into a NaN-filled buffer and expand into random y, so an
element left unwritten or written where it must not be shows.
"""

import itertools
import zlib

import pytest
import torch

import openlora_kernels as kernels
from openlora_kernels import reference
from openlora_kernels.checks import KernelArgumentError
from openlora_kernels.triton_ops import sgmv_expand as expand_op
from openlora_kernels.triton_ops import sgmv_shrink as shrink_op

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

TOLERANCE = {  # (atol, rtol): float32 sums in another order, then one rounding to the output dtype
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 2e-2),
}
RANKS = {"r1": 1, "r8": 8, "r16": 16, "r64": 64, "mixed": None}
POPULARITY = ("distinct", "uniform", "skewed", "identical")


def make_layout(gen, popularity, num_slots, with_none):
    """(seg_indptr, seg_slots) for one of Punica's four workloads."""
    if popularity == "distinct":  # decode: one row per adapter
        lengths = [1] * num_slots
        slots = torch.randperm(num_slots, generator=gen).tolist()
    elif popularity == "uniform":  # segments of mixed length, adapters drawn uniformly
        lengths = torch.randint(1, 9, (6,), generator=gen).tolist()
        slots = torch.randint(0, num_slots, (6,), generator=gen).tolist()
    elif popularity == "skewed":  # one hot adapter with a long prefill, a tail of one-row decodes
        lengths = [37, 1, 1, 3, 1, 0, 1]
        slots = [0, 0, 1, 0, 2, 3, 0]
    else:  # identical: every row uses one adapter
        lengths = [20, 5, 1]
        slots = [1, 1, 1]
    if with_none:
        lengths.insert(1, 1 if popularity == "distinct" else 2)
        slots.insert(1, -1)
        slots[-1] = -1
    seg_indptr = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    return seg_indptr, torch.tensor(slots, dtype=torch.int32)


def make_case(seed, dtype, in_features, out_features, rank_name, popularity, with_none):
    gen = torch.Generator().manual_seed(seed)
    num_slots = 8
    seg_indptr, seg_slots = make_layout(gen, popularity, num_slots, with_none)
    num_rows = int(seg_indptr[-1])
    if RANKS[rank_name] is None:  # heterogeneous ranks in an R=64 pool, zero padding past each rank
        rank_max = 64
        slot_ranks = torch.tensor([8, 64, 1, 16, 8, 64, 1, 16], dtype=torch.int32)
    else:
        rank_max = RANKS[rank_name]
        slot_ranks = torch.full((num_slots,), rank_max, dtype=torch.int32)
    lora_a = torch.randn(num_slots, rank_max, in_features, generator=gen) / in_features**0.5
    lora_b = torch.randn(num_slots, out_features, rank_max, generator=gen) / rank_max**0.5
    padding = torch.arange(rank_max)[None, :] >= slot_ranks[:, None]  # (S, R)
    lora_a[padding] = 0
    lora_b.transpose(1, 2)[padding] = 0
    return dict(
        x=torch.randn(num_rows, in_features, generator=gen).to(dtype),
        lora_a=lora_a.to(dtype),
        lora_b=lora_b.to(dtype),
        seg_indptr=seg_indptr,
        seg_slots=seg_slots,
        slot_ranks=slot_ranks,
        scale=torch.rand(num_slots, generator=gen) + 0.5,
        y=torch.randn(num_rows, out_features, generator=gen).to(dtype),
    )


def to_device(case):
    return {k: v.to(DEVICE) for k, v in case.items()}


def check_against_reference(case, dtype, *, split_k=None, path=None, pass_ranks=True, trusted=False):
    c = to_device(case)
    atol, rtol = TOLERANCE[dtype]
    ranks = c["slot_ranks"] if pass_ranks else None
    num_rows, rank_max = c["x"].shape[0], c["lora_a"].shape[1]
    lengths = (c["seg_indptr"][1:] - c["seg_indptr"][:-1]).long()
    hint = {"max_segment_rows": int(lengths.max())} if trusted else {}

    u_ref = reference.sgmv_shrink(c["x"], c["lora_a"], c["seg_indptr"], c["seg_slots"])
    out = torch.full((num_rows, rank_max), float("nan"), dtype=dtype, device=DEVICE)
    u = shrink_op.sgmv_shrink(
        c["x"],
        c["lora_a"],
        c["seg_indptr"],
        c["seg_slots"],
        ranks,
        out=out,
        split_k=split_k,
        path=path,
        **hint,
    )
    assert u.data_ptr() == out.data_ptr()
    torch.testing.assert_close(u, u_ref, atol=atol, rtol=rtol)

    # Expand from the same u on both sides, so the comparison sees expand alone.
    y_ref = c["y"].clone()
    reference.sgmv_expand(u_ref, c["lora_b"], c["seg_indptr"], c["seg_slots"], y_ref, c["scale"])
    y = c["y"].clone()
    expand_op.sgmv_expand(
        u_ref, c["lora_b"], c["seg_indptr"], c["seg_slots"], y, c["scale"], ranks, path=path
    )
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)
    no_adapter = torch.repeat_interleave(c["seg_slots"], lengths) < 0
    assert torch.equal(y[no_adapter], c["y"][no_adapter])  # rows of slot -1: bit for bit untouched
    assert not torch.equal(y[~no_adapter], c["y"][~no_adapter])  # the others did change


# The CI grid: every dtype x popularity x slot -1 combination; ranks and dims rotate through the cases
# so each rank and each dims pair meets every dtype.
DIMS = [(64, 48), (100, 130)]  # the second is not a multiple of any block size
CI_CASES = [
    pytest.param(dtype, dims, rank_name, popularity, with_none, id=f"{dt_name}-{dims[0]}x{dims[1]}-{rank_name}-{popularity}-{'none' if with_none else 'all'}")
    for i, ((dt_name, dtype), popularity, with_none) in enumerate(
        itertools.product([("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)], POPULARITY, (False, True))
    )
    for dims, rank_name in [(DIMS[i % 2], list(RANKS)[i % 5])]
]  # fmt: skip


@pytest.mark.parametrize(("dtype", "dims", "rank_name", "popularity", "with_none"), CI_CASES)
def test_triton_matches_reference(dtype, dims, rank_name, popularity, with_none):
    seed = zlib.crc32(repr((dtype, dims, rank_name, popularity, with_none)).encode())
    case = make_case(seed, dtype, *dims, rank_name, popularity, with_none)
    check_against_reference(case, dtype)


@pytest.mark.parametrize("rank_name", list(RANKS))
def test_every_rank_matches_reference_in_bfloat16_with_empty_and_unused_segments(rank_name):
    case = make_case(11, torch.bfloat16, 100, 130, rank_name, "skewed", with_none=True)
    check_against_reference(case, torch.bfloat16)


@pytest.mark.parametrize("path", ["segmented", "bgmv"])
@pytest.mark.parametrize("split_k", [1, 3])
def test_decode_paths_and_split_k_agree_with_reference(path, split_k):
    case = make_case(5, torch.float16, 300, 70, "mixed", "distinct", with_none=True)
    check_against_reference(case, torch.float16, split_k=split_k, path=path)


@pytest.mark.parametrize("popularity", ["distinct", "skewed"])
def test_host_supplied_max_segment_rows_gives_the_same_result(popularity):
    case = make_case(12, torch.bfloat16, 100, 130, "mixed", popularity, with_none=True)
    check_against_reference(case, torch.bfloat16, trusted=True)


def test_split_k_on_long_segments_matches_reference():
    case = make_case(6, torch.float32, 260, 48, "r16", "skewed", with_none=True)
    check_against_reference(case, torch.float32, split_k=4)


def test_without_slot_ranks_the_full_padded_rank_is_used():
    case = make_case(7, torch.float32, 64, 48, "mixed", "uniform", with_none=False)
    check_against_reference(case, torch.float32, pass_ranks=False)


def test_strided_rows_of_x_and_y_are_read_and_written_in_place():
    case = to_device(make_case(8, torch.float32, 64, 48, "r8", "uniform", with_none=True))
    wide_x = torch.randn(case["x"].shape[0], 100, device=DEVICE)
    wide_x[:, 10:74] = case["x"]
    wide_y = torch.randn(case["y"].shape[0], 90, device=DEVICE)
    y_view = wide_y[:, 20:68]  # a column slice of a fused projection output
    y_view.copy_(case["y"])
    before = wide_y.clone()
    args = (case["seg_indptr"], case["seg_slots"])
    u = shrink_op.sgmv_shrink(wide_x[:, 10:74], case["lora_a"], *args, case["slot_ranks"])
    torch.testing.assert_close(
        u, reference.sgmv_shrink(case["x"], case["lora_a"], *args), atol=1e-4, rtol=1e-4
    )
    expand_op.sgmv_expand(u, case["lora_b"], *args, y_view, case["scale"], case["slot_ranks"])
    y_ref = case["y"].clone()
    reference.sgmv_expand(u, case["lora_b"], *args, y_ref, case["scale"])
    torch.testing.assert_close(y_view, y_ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(wide_y[:, :20], before[:, :20]) and torch.equal(wide_y[:, 68:], before[:, 68:])


def test_forced_triton_through_the_public_functions(monkeypatch):
    monkeypatch.setenv("OPENLORA_KERNELS", "triton")
    case = to_device(make_case(9, torch.float16, 64, 48, "r16", "skewed", with_none=True))
    args = (case["seg_indptr"], case["seg_slots"])
    with pytest.raises(KernelArgumentError):  # proves the call reached the Triton launcher's checks
        kernels.sgmv_shrink(case["x"], case["lora_a"].float(), *args)
    u = kernels.sgmv_shrink(case["x"], case["lora_a"], *args, case["slot_ranks"])
    y = case["y"].clone()
    kernels.sgmv_expand(u, case["lora_b"], *args, y, case["scale"], case["slot_ranks"])
    y_ref = case["y"].clone()
    reference.sgmv_expand(reference.sgmv_shrink(case["x"], case["lora_a"], *args), case["lora_b"], *args, y_ref, case["scale"])  # fmt: skip
    torch.testing.assert_close(y, y_ref, atol=2e-2, rtol=2e-2)


def test_empty_batch_returns_an_empty_result():
    indptr, slots = torch.zeros(1, dtype=torch.int32), torch.zeros(0, dtype=torch.int32)
    u = shrink_op.sgmv_shrink(torch.randn(0, 64), torch.randn(2, 8, 64), indptr, slots)
    assert u.shape == (0, 8)
    expand_op.sgmv_expand(u, torch.randn(2, 32, 8), indptr, slots, torch.randn(0, 32), torch.ones(2))


@pytest.mark.skipif(
    DEVICE.type != "cpu", reason="checks the CPU interpreter; on CUDA the compiled kernels run instead"
)
def test_kernels_run_in_the_triton_interpreter_without_cuda():
    assert shrink_op._INTERPRETED and expand_op._INTERPRETED


def _valid_args():
    x = torch.randn(6, 64, dtype=torch.float16)
    lora_a = torch.randn(3, 8, 64, dtype=torch.float16)
    lora_b = torch.randn(3, 32, 8, dtype=torch.float16)
    indptr = torch.tensor([0, 2, 6], dtype=torch.int32)
    slots = torch.tensor([0, 2], dtype=torch.int32)
    return x, lora_a, lora_b, indptr, slots


@pytest.mark.parametrize(
    ("argument", "mutate"),
    [
        ("lora_a", lambda a: a.update(x=a["x"].float())),  # x and lora_a disagree: lora_a is named
        ("lora_a", lambda a: a.update(lora_a=a["lora_a"].float())),
        ("lora_a", lambda a: a.update(lora_a=a["lora_a"][:, :, :32])),
        ("lora_a", lambda a: a.update(lora_a=a["lora_a"].transpose(1, 2).contiguous().transpose(1, 2))),
        ("x", lambda a: a.update(x=a["x"].t().contiguous().t())),
        ("x", lambda a: a.update(x=a["x"].to(torch.int32))),
        ("seg_indptr", lambda a: a.update(seg_indptr=a["seg_indptr"].long())),
        ("seg_indptr", lambda a: a.update(seg_indptr=torch.tensor([0, 2, 5], dtype=torch.int32))),
        ("seg_indptr", lambda a: a.update(seg_indptr=torch.tensor([0, 4, 2, 6], dtype=torch.int32), seg_slots=torch.tensor([0, 1, 2], dtype=torch.int32))),
        ("seg_indptr", lambda a: a.update(seg_indptr=torch.tensor([0, 6], dtype=torch.int32))),
        ("seg_slots", lambda a: a.update(seg_slots=torch.tensor([0, 3], dtype=torch.int32))),
        ("seg_slots", lambda a: a.update(seg_slots=torch.tensor([-2, 0], dtype=torch.int32))),
        ("slot_ranks", lambda a: a.update(slot_ranks=torch.tensor([8, 9, 1], dtype=torch.int32))),
        ("slot_ranks", lambda a: a.update(slot_ranks=torch.tensor([8, 8], dtype=torch.int32))),
        ("out", lambda a: a.update(out=torch.empty(6, 4, dtype=torch.float16))),
        ("path", lambda a: a.update(path="bgmv")),
        ("split_k", lambda a: a.update(split_k=0)),
        ("max_segment_rows", lambda a: a.update(max_segment_rows=-1)),
    ],
)  # fmt: skip
def test_shrink_launcher_names_the_bad_argument(argument, mutate):
    x, lora_a, _, indptr, slots = _valid_args()
    kwargs = dict(x=x, lora_a=lora_a, seg_indptr=indptr, seg_slots=slots)
    mutate(kwargs)
    with pytest.raises(KernelArgumentError) as info:
        shrink_op.sgmv_shrink(**kwargs)
    assert info.value.argument == argument


@pytest.mark.parametrize(
    ("argument", "mutate"),
    [
        ("y", lambda a: a.update(y=a["y"].float())),
        ("y", lambda a: a.update(y=a["y"][:, :16])),
        ("lora_b", lambda a: a.update(lora_b=a["lora_b"][:, :, :4])),
        ("scale", lambda a: a.update(scale=a["scale"].half())),
        ("scale", lambda a: a.update(scale=torch.ones(2))),
        ("seg_slots", lambda a: a.update(seg_slots=torch.tensor([0, 5], dtype=torch.int32))),
        ("slot_ranks", lambda a: a.update(slot_ranks=torch.tensor([8, 8, -1], dtype=torch.int32))),
    ],
)
def test_expand_launcher_names_the_bad_argument(argument, mutate):
    x, _, lora_b, indptr, slots = _valid_args()
    kwargs = dict(
        u=x[:, :8].contiguous(), lora_b=lora_b, seg_indptr=indptr, seg_slots=slots,
        y=torch.randn(6, 32, dtype=torch.float16), scale=torch.ones(3),
    )  # fmt: skip
    mutate(kwargs)
    with pytest.raises(KernelArgumentError) as info:
        expand_op.sgmv_expand(**kwargs)
    assert info.value.argument == argument


# The larger grid: the full product at sizes near a real model; compiled kernels only.
GPU_DIMS = [(64, 48), (100, 130), (4096, 4096), (4096, 14336), (14336, 4096)]


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the full grid runs on CUDA (benchmarks/gpu_check.sh)"
)
@pytest.mark.parametrize("with_none", [False, True], ids=["all", "none"])
@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("rank_name", list(RANKS))
@pytest.mark.parametrize("dims", GPU_DIMS, ids=lambda d: f"{d[0]}x{d[1]}")
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
def test_triton_matches_reference_full_grid(dtype, dims, rank_name, popularity, with_none):
    case = make_case(17, dtype, *dims, rank_name, popularity, with_none)
    check_against_reference(case, dtype)
