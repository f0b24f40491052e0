"""Fused quantized projections: q|k|v and gate|up held in one QuantLinear, each slice loaded into its own
rows from its own checkpoint tensor in any order, compute what one QuantLinear per slice computes."""

from __future__ import annotations

import pytest
import torch

from data_plane.model.llama import LinearBuilder
from data_plane.model.quant import QuantSettings, make_quant_linear
from data_plane.model.quant.base import RowSlice


def _slices(out_slices, in_features, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(out, in_features, generator=g) * 0.05 + 0.01 for out in out_slices]


@pytest.mark.parametrize(
    ("fmt", "out_slices"),
    [("int8", (96, 32, 32)), ("int8", (40, 24)), ("int4", (128, 64, 64)), ("int4", (192, 192))],
)
@pytest.mark.parametrize("order", ["forward", "reversed"])
def test_a_fused_projection_computes_what_one_linear_per_slice_computes(fmt, out_slices, order):
    in_features = 128
    proj = LinearBuilder(QuantSettings(fmt)).projection(in_features, out_slices, bias=False)
    assert len(proj.linears) == 1 and all(isinstance(q, RowSlice) for q in proj.quants)
    weights = _slices(out_slices, in_features, seed=len(out_slices))
    pairs = list(zip(proj.quants, weights, strict=True))
    for handle, w in reversed(pairs) if order == "reversed" else pairs:
        handle.load_weight(w)
    separate = []
    for w in weights:
        linear = make_quant_linear(fmt, in_features, w.shape[0], torch.device("cpu"))
        linear.load_weight(w)
        separate.append(linear)
    for handle, linear in zip(proj.quants, separate, strict=True):
        assert torch.equal(handle.dequantize(), linear.dequantize())  # the same codes, scales and offsets
    x = torch.randn(5, in_features, generator=torch.Generator().manual_seed(9))
    fused_y = proj.base_forward(x)
    separate_y = torch.cat([linear(x) for linear in separate], dim=1)
    torch.testing.assert_close(fused_y, separate_y, rtol=1e-5, atol=1e-6)


def test_int4_keeps_one_linear_per_slice_where_a_slice_cannot_start_a_packed_block():
    # 96 rows: the next slice would start inside a 64-row packed block.
    proj = LinearBuilder(QuantSettings("int4")).projection(128, (96, 32, 32), bias=False)
    assert len(proj.linears) == 3 and proj.quants == list(proj.linears)
    fused = LinearBuilder(QuantSettings("int8")).projection(128, (96, 32, 32), bias=False)
    assert len(fused.linears) == 1


@pytest.mark.parametrize(
    ("fmt", "start", "rows", "words"),
    [
        ("int4", 32, 64, "blocks of 64"),  # starts inside a packed block
        ("int4", 0, 96, "block of 64"),  # ends inside one, and is not the last
        ("int8", 100, 40, "do not fit"),  # past the weight's rows
        ("int8", 0, 10, "expected [r, 128]"),  # wrong input width (below)
    ],
)
def test_row_blocks_that_do_not_fit_the_layout_are_refused(fmt, start, rows, words, int4_kernel):
    int4_kernel("tinygemm")  # its tiles of 64 rows are the rule (the native layout keeps the start rule)
    linear = make_quant_linear(fmt, 128, 128, torch.device("cpu"))
    width = 64 if words.startswith("expected") else 128
    with pytest.raises(ValueError) as e:
        linear.load_rows(start, torch.randn(rows, width))
    assert words in str(e.value)
