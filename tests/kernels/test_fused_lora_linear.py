"""A fused LoRALinear (q|k|v-like slices sharing one rank-interleaved A pool) against each slice computed on
its own with a naive per-row loop: every slice's adapters, ranks and scales, a slice an adapter leaves
alone, the step's rank trimming, and both SGMV implementations (Triton through the interpreter on CPU)."""

import itertools

import pytest
import torch

import openlora_kernels as kernels
from data_plane.model.lora_linear import LoRALinear
from data_plane.model.metadata import LoraSegments

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
IN_FEATURES, OUT_SLICES, MAX_RANK, NUM_SLOTS = 40, (24, 8, 8), 16, 12
# slot -> (rank, slices it targets); slot 2 leaves slice 1 (k) alone, as a q/v-only adapter does
ADAPTERS = {
    0: (4, (0, 1, 2)),
    2: (8, (0, 2)),
    3: (12, (1,)),
    5: (2, (0, 1, 2)),
    9: (8, (1, 2)),
    11: (4, (0,)),
}


def _layout(segments):
    """segments: [(rows, slot)] -> (seg_indptr, seg_slots) host lists."""
    bounds = [0, *itertools.accumulate(rows for rows, _ in segments)]
    return bounds, [slot for _, slot in segments]


LAYOUTS = {  # each of the reference's strategies: segment loop, gather, slot-range view, dense view
    "prefill": [(9, 0), (3, -1), (7, 2), (5, 3)],
    "decode-shared": [(1, 0), (1, 2), (1, 3), (1, 5), (1, -1), (1, 0), (1, 2), (1, 3), (1, 5), (1, 2)],
    "decode-gappy": [(1, s) for s in (0, 2, 3, 5, -1, 7, 9, 10, 11, 4)],
    "decode-dense": [(1, s) for s in range(NUM_SLOTS)],
}


def _fused_layer(gen):
    layer = LoRALinear(IN_FEATURES, OUT_SLICES, bias=True).to(DEVICE)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen))
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen))
    layer.allocate_slots(NUM_SLOTS, MAX_RANK)
    factors = {}
    for slot, (rank, targets) in ADAPTERS.items():
        for index, out in enumerate(OUT_SLICES):
            if index not in targets:
                layer.load_slot(slot, None, None, 0.0, index)
                continue
            a = torch.randn(rank, IN_FEATURES, generator=gen)
            b = torch.randn(out, rank, generator=gen)
            scale = 0.5 + slot + index
            layer.load_slot(slot, a.to(DEVICE), b.to(DEVICE), scale, index)
            factors[slot, index] = (a, b, scale)
    return layer, factors


def _expected(x, layer, factors, bounds, slots):
    y = x @ layer.weight.cpu().T + layer.bias.cpu()
    offsets = [0, *itertools.accumulate(OUT_SLICES)]
    for g, slot in enumerate(slots):
        for row in range(bounds[g], bounds[g + 1]):
            for index in range(len(OUT_SLICES)):
                if (slot, index) in factors:
                    a, b, scale = factors[slot, index]
                    y[row, offsets[index] : offsets[index + 1]] += scale * (b @ (a @ x[row]))
    return y


@pytest.mark.parametrize("use_triton", [False, True], ids=["reference", "triton"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fused_slices_match_each_slice_on_its_own(layout, use_triton):
    gen = torch.Generator().manual_seed(len(layout) * 7 + use_triton)
    layer, factors = _fused_layer(gen)
    bounds, slots = _layout(LAYOUTS[layout])
    x = torch.randn(bounds[-1], IN_FEATURES, generator=gen)
    used = [s for s in slots if s >= 0]
    lora = LoraSegments(
        seg_indptr=torch.tensor(bounds, dtype=torch.int32, device=DEVICE),
        seg_slots=torch.tensor(slots, dtype=torch.int32, device=DEVICE),
        max_rank=max(ADAPTERS.get(s, (0,))[0] for s in used),  # below MAX_RANK: the reference trims
        max_segment_rows=max(end - start for start, end in itertools.pairwise(bounds)),
        use_triton=use_triton,
        plan=None if use_triton else kernels.plan_segments(bounds, slots, DEVICE),
    )
    y = layer(x.to(DEVICE), lora).cpu()
    torch.testing.assert_close(y, _expected(x, layer, factors, bounds, slots), atol=1e-4, rtol=1e-4)


def test_clearing_a_slice_removes_only_that_slice():
    gen = torch.Generator().manual_seed(3)
    layer, factors = _fused_layer(gen)
    layer.load_slot(0, None, None, 0.0, 1)
    del factors[0, 1]
    bounds, slots = _layout([(4, 0), (2, 2)])
    x = torch.randn(6, IN_FEATURES, generator=gen)
    lora = LoraSegments(
        seg_indptr=torch.tensor(bounds, dtype=torch.int32, device=DEVICE),
        seg_slots=torch.tensor(slots, dtype=torch.int32, device=DEVICE),
        max_rank=MAX_RANK,
        max_segment_rows=4,
        use_triton=False,
        plan=kernels.plan_segments(bounds, slots, DEVICE),
    )
    y = layer(x.to(DEVICE), lora).cpu()
    torch.testing.assert_close(y, _expected(x, layer, factors, bounds, slots), atol=1e-4, rtol=1e-4)
