"""The CPU's native SGMV kernels (openlora_kernels/sgmv_cpu.c through data_plane/model/native_lora.py) against a
float64 product per row, on the layouts a serving step has: one-row decode segments on scattered slots, a
popular adapter's rows together, a prompt chunk long enough to go to torch, rows without an adapter, mixed
ranks over garbage past each rank, fused groups' rank-interleaved A, and B in both layouts. The C code
trusts its indices, so every shape it relies on is refused before a call."""

from __future__ import annotations

import itertools

import pytest
import torch

from data_plane.model.native_lora import MAX_NATIVE_SEGMENT_ROWS, NativeLora
from data_plane.model.quant.native import NativeSegments, native_kernels, native_kernels_problem


@pytest.fixture(scope="module")
def cpu_kernels():
    kernels = native_kernels()
    assert kernels is not None, native_kernels_problem()  # the test machine has a C compiler
    return kernels


def _expected(x, lora_a, lora_b, scale, y0, bounds, slots, ranks, n, slices):
    """y0 + each row's LoRA, computed row by row in float64 from the first `rank` columns only."""
    y = y0.double().clone()
    max_rank = lora_a.shape[1] // n
    offsets = [0]
    for b in lora_b:
        offsets.append(offsets[-1] + b.shape[1])
    for g, slot in enumerate(slots):
        if slot < 0:
            continue
        rank = min(ranks[slot], max_rank)
        for row in range(bounds[g], bounds[g + 1]):
            for i in slices:
                a = lora_a[slot].view(max_rank, n, -1)[:rank, i].double()  # (rank, in)
                delta = lora_b[i][slot, :, :rank].double() @ (a @ x[row].double())
                y[row, offsets[i] : offsets[i + 1]] += scale[i, slot].double() * delta
    return y


LAYOUTS = {
    # (segment lengths, slots; -1: no adapter)
    "decode, one row per slot": ([1] * 12, [7, 2, 9, 0, 11, 4, 3, 10, 1, 8, 5, 6]),
    # enough segments that every work item takes a whole segment at up to 10 threads
    "decode, many rows per slot": ([1] * 40, [(7 * i) % 12 for i in range(40)]),
    "decode, popular adapters together": ([9, 1, 4, 1, 2, 1, 1], [3, 0, 5, 11, 2, 7, 9]),
    # as many segments, of 1 to 6 rows: whole segments per work item, rows in blocks and a remainder
    "decode, many segments of several rows": (
        [i % 6 + 1 for i in range(40)],
        [(5 * i) % 12 for i in range(40)],
    ),
    "prompt chunk among decodes": ([MAX_NATIVE_SEGMENT_ROWS + 7, 1, 3, 1], [4, 0, 8, 2]),
    "rows without an adapter": ([2, 3, 1, 4, 1], [-1, 6, -1, 1, 10]),
    "one long segment": ([MAX_NATIVE_SEGMENT_ROWS + 1], [5]),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "outs",
    [(24,), (24, 8, 8), (37, 37), (150,), (77, 133)],
    # wider than a tile of the expand's sums on the stack (64 outputs): the sums in a thread's scratch,
    # outputs that are not a whole number of vectors
    ids=["one slice", "q|k|v", "gate|up", "one wide slice", "two wide slices"],
)
@pytest.mark.parametrize("b_layout", ["outputs contiguous", "(S, O, R)"])
def test_native_lora_matches_a_float64_product_per_row(cpu_kernels, layout, outs, b_layout):
    gen = torch.Generator().manual_seed(len(layout) + sum(outs))
    lengths, slots = LAYOUTS[layout]
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + length)
    # 43 inputs: the shrink's unrolled vectors, then single vectors, then single floats at any vector width
    num_slots, max_rank, h_in, n = 12, 8, 43, len(outs)
    ranks = [8, 2, 4, 8, 1, 4, 3, 8, 5, 6, 7, 2]
    x = torch.randn(bounds[-1], h_in, generator=gen)
    # Garbage past each slot's rank (the pools hold zeros there; the kernels must not read it either).
    lora_a = torch.randn(num_slots, max_rank * n, h_in, generator=gen)
    lora_b = [torch.randn(num_slots, out, max_rank, generator=gen) for out in outs]
    if b_layout == "outputs contiguous":
        lora_b = [b.transpose(1, 2).contiguous().transpose(1, 2) for b in lora_b]
    scale = torch.rand(n, num_slots, generator=gen) * 2 - 0.5
    y0 = torch.randn(bounds[-1], sum(outs), generator=gen)
    y = y0.clone()
    native = NativeLora.plan(bounds, slots, ranks, num_slots, cpu_kernels)
    assert native.short.count + len(native.long) == sum(1 for s in slots if s >= 0)
    native.add(x, y, lora_a, lora_b, scale, range(n), _bounds(outs))
    expected = _expected(x, lora_a, lora_b, scale, y0, bounds, slots, ranks, n, range(n))
    torch.testing.assert_close(y.double(), expected, atol=1e-4, rtol=1e-4)
    no_adapter = [row for g, s in enumerate(slots) if s < 0 for row in range(bounds[g], bounds[g + 1])]
    assert torch.equal(y[no_adapter], y0[no_adapter])  # rows without an adapter are untouched


def _bounds(outs):
    start, bounds = 0, []
    for out in outs:
        bounds.append((start, start + out))
        start += out
    return bounds


def test_slices_left_out_are_left_alone(cpu_kernels):
    gen = torch.Generator().manual_seed(3)
    outs, n, num_slots = (16, 8, 8), 3, 4
    bounds, slots, ranks = [0, 1, 3, 4], [2, 0, 3], [4, 4, 4, 4]
    x = torch.randn(4, 32, generator=gen)
    lora_a = torch.randn(num_slots, 4 * n, 32, generator=gen)
    lora_b = [torch.randn(num_slots, out, 4, generator=gen) for out in outs]
    scale = torch.rand(n, num_slots, generator=gen)
    y0 = torch.randn(4, sum(outs), generator=gen)
    y = y0.clone()
    native = NativeLora.plan(bounds, slots, ranks, num_slots, cpu_kernels)
    native.add(x, y, lora_a, lora_b, scale, [0, 2], _bounds(outs))
    expected = _expected(x, lora_a, lora_b, scale, y0, bounds, slots, ranks, n, [0, 2])
    torch.testing.assert_close(y.double(), expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(y[:, 16:24], y0[:, 16:24])


def test_segments_outside_the_rows_or_slots_are_refused():
    for segment in [(0, 5, 0, 4), (2, 2, 0, 4), (-1, 1, 0, 4), (0, 1, 4, 4), (0, 1, -1, 4), (0, 1, 0, -1)]:
        with pytest.raises(ValueError, match="outside"):
            NativeSegments([segment], num_rows=4, num_slots=4)


def test_tensors_the_kernels_cannot_read_as_assumed_are_refused(cpu_kernels):
    segments = NativeSegments([(0, 2, 1, 4), (2, 3, 3, 4)], num_rows=3, num_slots=4)
    x, a = torch.randn(3, 16), torch.randn(4, 4, 16)
    b, scale, y = torch.randn(4, 8, 4), torch.rand(4), torch.zeros(3, 8)
    u = cpu_kernels.sgmv_shrink(x, a, segments)
    refusals = {
        "x of other rows": lambda: cpu_kernels.sgmv_shrink(torch.randn(2, 16), a, segments),
        "x of other width": lambda: cpu_kernels.sgmv_shrink(torch.randn(3, 15), a, segments),
        "x in float64": lambda: cpu_kernels.sgmv_shrink(x.double(), a, segments),
        "x with strided columns": lambda: cpu_kernels.sgmv_shrink(torch.randn(16, 3).T, a, segments),
        "a with fewer slots": lambda: cpu_kernels.sgmv_shrink(x, a[:3], segments),
        "a with no dimension contiguous": lambda: cpu_kernels.sgmv_shrink(x, a[:, :, ::2], segments),
        "y of other rows": lambda: cpu_kernels.sgmv_expand(u, b, scale, segments, torch.zeros(2, 8)),
        "y of other width": lambda: cpu_kernels.sgmv_expand(u, b, scale, segments, torch.zeros(3, 9)),
        "b wider than u": lambda: cpu_kernels.sgmv_expand(u[:, :2], b, scale, segments, y),
        "b strided both ways": lambda: cpu_kernels.sgmv_expand(u, b[:, ::2, ::2], scale, segments, y[:, :4]),
        "scale of other slots": lambda: cpu_kernels.sgmv_expand(u, b, scale[:3], segments, y),
        "scale in float64": lambda: cpu_kernels.sgmv_expand(u, b, scale.double(), segments, y),
    }
    for what, call in refusals.items():
        with pytest.raises(ValueError):
            call()
            pytest.fail(f"{what} was accepted")
    assert torch.equal(y, torch.zeros(3, 8))  # nothing was written by a refused call


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("count", [3, 40], ids=["few segments", "a segment per work item"])
def test_one_call_gives_the_sums_of_separate_shrink_and_expand_calls(cpu_kernels, threads, count):
    """`sgmv_lora` runs a projection's shrink and every slice's expand in one call, a whole segment per work
    item when there are enough of them (u on the work item's stack), else the shrink and the expands shared
    out over columns and tiles: both give exactly the floats of separate `sgmv_shrink` / `sgmv_expand` calls
    (the same sums in the same order), and the float64 product."""
    gen = torch.Generator().manual_seed(count)
    outs, n, num_slots, max_rank, h_in = (24, 8, 8), 3, 12, 8, 40
    ranks = [8, 2, 4, 8, 1, 4, 3, 8, 5, 6, 7, 2]
    lengths = [1 + (i % 3) for i in range(count)]
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + length)
    slots = [(5 * i) % num_slots for i in range(count)]
    x = torch.randn(bounds[-1], h_in, generator=gen)
    lora_a = torch.randn(num_slots, max_rank * n, h_in, generator=gen)
    lora_b = [torch.randn(num_slots, out, max_rank, generator=gen).transpose(1, 2).contiguous().transpose(1, 2)
              for out in outs]  # fmt: skip
    scale = torch.rand(n, num_slots, generator=gen)
    y0 = torch.randn(bounds[-1], sum(outs), generator=gen)
    segments = NativeSegments(
        [(bounds[g], bounds[g + 1], slot, ranks[slot]) for g, slot in enumerate(slots)], bounds[-1], num_slots
    )
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        one_call = y0.clone()
        cpu_kernels.sgmv_lora(x, lora_a, lora_b, scale, segments, one_call, range(n), _bounds(outs))
        separate = y0.clone()
        u = cpu_kernels.sgmv_shrink(x, lora_a, segments, rank_columns=n)
        for i, (start, end) in enumerate(_bounds(outs)):
            cpu_kernels.sgmv_expand(u[:, i::n], lora_b[i], scale[i], segments, separate[:, start:end])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one_call, separate)
    expected = _expected(x, lora_a, lora_b, scale, y0, bounds, slots, ranks, n, range(n))
    torch.testing.assert_close(one_call.double(), expected, atol=1e-4, rtol=1e-4)


def test_what_the_one_call_cannot_read_as_assumed_is_refused(cpu_kernels):
    from data_plane.model.quant.native import SGMV_MAX_COLS

    segments = NativeSegments([(0, 2, 1, 4), (2, 3, 3, 4)], num_rows=3, num_slots=4)
    x, a = torch.randn(3, 16), torch.randn(4, 8, 16)  # two slices of rank 4
    b = [torch.randn(4, 8, 4), torch.randn(4, 6, 4)]
    scale, y, bounds = torch.rand(2, 4), torch.zeros(3, 14), [(0, 8), (8, 14)]

    def call(x=x, a=a, b=b, scale=scale, y=y, slices=range(2), bounds=bounds):
        cpu_kernels.sgmv_lora(x, a, b, scale, segments, y, slices, bounds)

    refusals = {
        "x of other rows": lambda: call(x=torch.randn(2, 16)),
        "x of other width": lambda: call(x=torch.randn(3, 15)),
        "y of other rows": lambda: call(y=torch.zeros(2, 14)),
        "y with strided columns": lambda: call(y=torch.zeros(14, 3).T),
        "a wider than the kernels' u": lambda: call(a=torch.randn(4, SGMV_MAX_COLS + 2, 16)),
        "a of columns that are no whole ranks": lambda: call(a=torch.randn(4, 7, 16)),
        "a with fewer slots": lambda: call(a=a[:3]),
        "b wider than its share of a": lambda: call(b=[torch.randn(4, 8, 5), b[1]]),
        "b of fewer slots": lambda: call(b=[b[0][:3], b[1]]),
        "b of other outputs than its columns of y": lambda: call(b=[torch.randn(4, 9, 4), b[1]]),
        "columns of y past its width": lambda: call(bounds=[(0, 8), (10, 16)]),
        "b strided both ways": lambda: call(b=[torch.randn(4, 16, 8)[:, ::2, ::2], b[1]]),
        "scale of other slots": lambda: call(scale=torch.rand(2, 3)),
        "scale of other slices": lambda: call(scale=torch.rand(4)),
        "scale in float64": lambda: call(scale=scale.double()),
        "a slice past the pools": lambda: call(slices=[0, 2]),
    }
    for what, refused in refusals.items():
        with pytest.raises(ValueError):
            refused()
            pytest.fail(f"{what} was accepted")
    assert torch.equal(y, torch.zeros(3, 14))  # nothing was written by a refused call


def test_the_one_call_works_while_a_model_is_built_on_the_meta_device(cpu_kernels):
    """The loader builds models under `torch.device("meta")`, and the library's first use (its check at
    load) may come then: a tensor the call makes for the C code without naming the CPU was a meta tensor,
    whose address 0 the C code read."""
    gen = torch.Generator().manual_seed(5)
    segments = NativeSegments([(0, 1, 0, 2), (1, 3, 1, 2)], num_rows=3, num_slots=2)
    x, a, b = (
        torch.randn(3, 8, generator=gen),
        torch.randn(2, 2, 8, generator=gen),
        torch.randn(2, 4, 2, generator=gen),
    )
    scale = torch.ones(1, 2)
    y = torch.zeros(3, 4)
    with torch.device("meta"):
        cpu_kernels.sgmv_lora(x, a, [b], scale, segments, y, range(1), [(0, 4)])
    expected = _expected(x, a, [b], scale, torch.zeros(3, 4), [0, 1, 3], [0, 1], [2, 2], 1, range(1))
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)


def _lora_segments(bounds, slots, ranks, num_slots, kernels):
    from data_plane.model.metadata import LoraSegments

    return LoraSegments(
        seg_indptr=torch.tensor(bounds, dtype=torch.int32),
        seg_slots=torch.tensor(slots, dtype=torch.int32),
        max_rank=max(ranks),
        max_segment_rows=max(b - a for a, b in itertools.pairwise(bounds)),
        use_triton=False,
        plan=None,
        native=NativeLora.plan(bounds, slots, ranks, num_slots, kernels),
    )


def test_a_layer_checks_its_pools_once_and_again_when_they_are_replaced(cpu_kernels):
    """A projection's pools are checked for the C code once (`LoRALinear.native_pools`), not on every call;
    a handle is used only while the layer holds the very tensors and slices it was made for, so pools
    allocated again (more slots, another rank) or replaced are never read through a stale address."""
    from data_plane.model.lora_linear import LoRALinear

    gen = torch.Generator().manual_seed(11)
    layer = LoRALinear(40, (24, 70), bias=False)
    layer.weight.data = torch.randn(94, 40, generator=gen)
    layer.allocate_slots(2, 4)
    first = layer.native_pools(cpu_kernels, (0, 1))
    assert layer.native_pools(cpu_kernels, (0, 1)) is first
    only_up = layer.native_pools(cpu_kernels, (1,))
    assert only_up is not first and only_up.slices == (1,)
    layer.allocate_slots(6, 8)  # more slots, a higher rank: new tensors
    again = layer.native_pools(cpu_kernels, (0, 1))
    assert again is not first and again.lora_a is layer.lora_a and again.lora_a.shape[0] == 6
    for slot in range(6):
        for i, out in enumerate((24, 70)):
            rank = 8 - slot
            layer.load_slot(
                slot, torch.randn(rank, 40, generator=gen), torch.randn(out, rank, generator=gen), 0.5, i
            )
    bounds, slots, ranks = [0, 2, 3, 7, 8], [5, 0, 3, 4], [8, 7, 6, 5, 4, 3]
    x = torch.randn(8, 40, generator=gen)
    y = torch.zeros(8, 94)
    layer._add_lora(x, y, _lora_segments(bounds, slots, ranks, 6, cpu_kernels))
    expected = _expected(
        x, layer.lora_a, layer.lora_b, layer.lora_scale, torch.zeros(8, 94), bounds, slots, ranks, 2, range(2)
    )
    torch.testing.assert_close(y.double(), expected, atol=1e-4, rtol=1e-4)
    layer.lora_b = [b.clone() for b in layer.lora_b]  # replaced outside allocate_slots
    assert layer.native_pools(cpu_kernels, (0, 1)).lora_b[0] is layer.lora_b[0]


def test_checked_pools_refuse_what_does_not_fit_them(cpu_kernels):
    """What `sgmv_lora_pools` still checks per call: x and y against the pools' widths and rows, and the
    step's slots against the pools' slots."""
    x, a, b = torch.randn(3, 16), torch.randn(4, 8, 16), [torch.randn(4, 8, 4), torch.randn(4, 6, 4)]
    pools = cpu_kernels.lora_pools(a, b, torch.rand(2, 4), range(2), [(0, 8), (8, 14)], 14)
    segments = NativeSegments([(0, 2, 1, 4), (2, 3, 3, 4)], num_rows=3, num_slots=4)
    y = torch.zeros(3, 14)
    refusals = {
        "x of other width": lambda: cpu_kernels.sgmv_lora_pools(torch.randn(3, 15), pools, segments, y),
        "x of other rows": lambda: cpu_kernels.sgmv_lora_pools(torch.randn(2, 16), pools, segments, y),
        "y of other width": lambda: cpu_kernels.sgmv_lora_pools(x, pools, segments, torch.zeros(3, 15)),
        "y with strided columns": lambda: cpu_kernels.sgmv_lora_pools(
            x, pools, segments, torch.zeros(14, 3).T
        ),
        "segments on more slots": lambda: cpu_kernels.sgmv_lora_pools(
            x, pools, NativeSegments([(0, 3, 4, 4)], num_rows=3, num_slots=5), y
        ),
        "columns of y past its width": lambda: cpu_kernels.lora_pools(
            a, b, torch.rand(2, 4), range(2), [(0, 8), (8, 14)], 13
        ),
    }
    for what, refused in refusals.items():
        with pytest.raises(ValueError):
            refused()
            pytest.fail(f"{what} was accepted")
    assert torch.equal(y, torch.zeros(3, 14))
    cpu_kernels.sgmv_lora_pools(x, pools, segments, y)
    assert y.abs().sum() > 0
