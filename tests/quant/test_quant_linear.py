"""The int8 and int4 QuantLinear kernels against their pure-torch dequantize-then-matmul references, on
odd shapes; the packing round trip; the quantization error bound; streaming in chunks; resident bytes."""

from __future__ import annotations

import functools

import pytest
import torch

from data_plane.engine.config import EngineConfig
from data_plane.model.quant import (
    QuantizationError,
    QuantSettings,
    base,
    make_quant_linear,
    set_reference_kernels,
)
from data_plane.model.quant.int4 import dequantize_int4, int4_group_size, quantize_int4
from data_plane.model.quant.int8 import dequantize_int8, quantize_int8

FORMATS = ("int8", "int4")
# (out_features, in_features): odd row counts and input dimensions of each int4 group size (128: 128,
# 1024; 64: 64, 192; 32: 96, 352).
SHAPES = [(10, 96), (344, 128), (7, 64), (33, 1024), (24, 192), (128, 352)]
# int8 only: input dimensions that int4 cannot group and that int8's kernel pads to a multiple of 16,
# among them the demo model's down projection (344 inputs).
INT8_SHAPES = [(128, 344), (1000, 100), (64, 200)]
CASES = [(fmt, shape) for fmt in FORMATS for shape in SHAPES] + [("int8", shape) for shape in INT8_SHAPES]
# Relative to the largest |reference| output, by (format, activation dtype): the kernels compute in
# bfloat16 (inputs and outputs rounded to 8 significant bits), the reference in float32; int8 on float32
# activations splits them into two int8 digits (16 bits a row) and sums in int32. int4 here is tinygemm,
# the kernel where the native one cannot be built; the native kernel has its own test below.
TOLERANCE = {
    ("int4", torch.float32): 1e-2,
    ("int4", torch.bfloat16): 2e-2,
    ("int8", torch.float32): 2e-4,
    ("int8", torch.bfloat16): 2e-2,
}


def _weight(shape: tuple[int, int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 0.05 + 0.01  # an offset, so int4's groups are not centred


def _canonical(fmt: str, w: torch.Tensor) -> torch.Tensor:
    """W as quantized by the pure-torch functions alone: the oracle for the packed layouts."""
    if fmt == "int8":
        return dequantize_int8(*quantize_int8(w))
    return dequantize_int4(*quantize_int4(w, int4_group_size(w.shape[1])))


def _layer(fmt: str, w: torch.Tensor):
    layer = make_quant_linear(fmt, w.shape[1], w.shape[0], torch.device("cpu"))
    layer.load_weight(w)
    return layer


@pytest.mark.parametrize(("fmt", "shape"), CASES)
@pytest.mark.parametrize("num_rows", [1, 5, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_the_dequantize_then_matmul_reference(
    fmt, shape, num_rows, dtype, int8_fp32_path, int4_kernel
):
    int8_fp32_path(True)  # the precise path; the other is checked below
    int4_kernel("tinygemm")
    layer = _layer(fmt, _weight(shape, 1))
    x = torch.randn(num_rows, shape[1], generator=torch.Generator().manual_seed(2)).to(dtype)
    got, want = layer.kernel(x), layer.reference(x)
    assert got.dtype == dtype and got.shape == (num_rows, shape[0])
    error = (got.float() - want.float()).abs().max() / want.float().abs().max()
    assert error < TOLERANCE[fmt, dtype]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("num_rows", [1, 3, 8, 9, 16, 17, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_native_kernel_computes_the_dequantized_product_in_float32(shape, num_rows, dtype, int4_kernel):
    # Token counts on both sides of the fused kernel's tile (8) and of its switch to dequantize-then-GEMM
    # (NATIVE_MM_MAX_TOKENS); float32 throughout, so only the summation order differs from the reference.
    # bfloat16 activations are exact in float32; the output is rounded to bfloat16 once.
    int4_kernel("native")
    layer = _layer("int4", _weight(shape, 1))
    assert layer.kernel_name.startswith("native")
    x = torch.randn(num_rows, shape[1], generator=torch.Generator().manual_seed(2)).to(dtype)
    got, want = layer.kernel(x), layer.reference(x.float())
    assert got.dtype == dtype and got.shape == (num_rows, shape[0])
    error = ((got.float() - want).abs() / want.abs().max()).max()
    assert error < (2e-6 if dtype == torch.float32 else 2**-8)


@pytest.mark.parametrize("shape", [(10, 96), (128, 344), (1000, 100), (33, 1024), (7, 16), (5, 250)])
@pytest.mark.parametrize("num_rows", [1, 2, 3, 4, 5, 9])
def test_int8_native_kernel_takes_few_float32_rows_and_computes_them_in_float32(
    shape, num_rows, int8_fp32_path
):
    # Widths past the last whole vector (100, 250, 344), rows K_pad apart; past NATIVE_MM_MAX_TOKENS rows
    # the chosen integer path serves instead (here the two-digit one, within its own 2e-4).
    from data_plane.model.quant import int8

    int8_fp32_path(True, native_rows=True)
    layer = _layer("int8", _weight(shape, 1))
    x = torch.randn(num_rows, shape[1], generator=torch.Generator().manual_seed(2))
    native = num_rows <= int8.NATIVE_MM_MAX_TOKENS
    assert layer.uses_native(x) is native
    assert not layer.uses_native(x.to(torch.bfloat16))  # bfloat16 models keep the bfloat16 kernel
    got, want = layer.kernel(x), layer.reference(x)
    assert got.dtype == torch.float32 and got.shape == (num_rows, shape[0])
    error = ((got - want).abs() / want.abs().max()).max()
    assert error < (2e-6 if native else TOLERANCE["int8", torch.float32])


def test_int4_native_kernel_keeps_tiny_and_huge_activations(int4_kernel):
    # No bfloat16 step anywhere: rows at 1e-30 and 1e30 keep their relative precision (tinygemm's
    # bfloat16 has the range but 8 bits; float16 would lose both ends).
    int4_kernel("native")
    layer = _layer("int4", _weight((48, 256), 13))
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(14))
    x = x * torch.tensor([1e-30, 1.0, 1e30, 0.0]).unsqueeze(1)
    got, want = layer.kernel(x), layer.reference(x)
    assert torch.equal(got[3], torch.zeros(48))
    for row in range(3):
        assert ((got[row] - want[row]).abs().max() / want[row].abs().max()) < 2e-6, row


@pytest.mark.parametrize("shape", [(10, 96), (128, 344), (1000, 100)])
@pytest.mark.parametrize("num_rows", [1, 32])
def test_int8_float32_activations_through_int8pack_are_rounded_like_bfloat16(shape, num_rows, int8_fp32_path):
    # Where the two-digit path is slow (no fast int8 product on the CPU), float32 activations take the
    # bfloat16 kernel: its output is the bfloat16 kernel's, converted back.
    int8_fp32_path(False)
    layer = _layer("int8", _weight(shape, 1))
    x = torch.randn(num_rows, shape[1], generator=torch.Generator().manual_seed(2))
    got = layer.kernel(x)
    assert got.dtype == torch.float32
    assert torch.equal(got, layer.kernel(x.to(torch.bfloat16)).float())
    want = layer.reference(x)
    error = (got - want).abs().max() / want.abs().max()
    assert error < TOLERANCE["int8", torch.bfloat16]


@pytest.mark.parametrize("rows", [1, 3, 32, 33])
def test_stacked_digits_give_the_separate_products_result_to_the_bit(rows, monkeypatch):
    """One product of both digits (2T rows) or two of T rows: the same int32 sums, the same floats; past
    STACK_MAX_ROWS the stacked call takes two products."""
    from data_plane.model.quant import int8

    g = torch.Generator().manual_seed(rows)
    q, scale = int8.quantize_int8(torch.randn(48, 80, generator=g))
    x = torch.randn(rows, 80, generator=g) * torch.logspace(-3, 3, rows).unsqueeze(1)
    separate = int8.int8_two_digit_mm(x, q, scale)
    products, int_mm = [], torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: products.append(a.shape[0]) or int_mm(a, b))
    assert torch.equal(int8.int8_two_digit_mm(x, q, scale, stacked=True), separate)
    assert products == ([2 * rows] if rows <= int8.STACK_MAX_ROWS else [rows, rows])
    want = x @ int8.dequantize_int8(q, scale).T
    assert ((separate - want).abs().amax(1) / want.abs().amax(1)).max() < 1e-4


def _times(monkeypatch, int8, packed_s, separate_s, stacked_s) -> None:
    """The process's one measurement, as given; the choices read from it again."""
    monkeypatch.setattr(int8, "two_digit_times", lambda: int8.TwoDigitTimes(packed_s, separate_s, stacked_s))
    int8.two_digit_path_chosen.cache_clear()


def test_digits_are_stacked_where_the_measurement_finds_it_faster(monkeypatch):
    from data_plane.model.quant import int8

    for times, stacked in (((1.0, 3.7, 1.9), True), ((1.0, 1.4, 1.6), False), ((None, 2.0, 1.0), True)):
        _times(monkeypatch, int8, *times)
        assert int8.two_digit_stacks() is stacked
    monkeypatch.undo()
    int8.two_digit_path_chosen.cache_clear()


def test_the_two_digit_path_is_chosen_where_it_is_not_much_slower(monkeypatch):
    from data_plane.model.quant import int8

    for cost, chosen in ((1.4, True), (3.9, True), (int8.TWO_DIGIT_MAX_COST, True), (14.0, False)):
        _times(monkeypatch, int8, 1.0, cost * 2, cost)  # the faster layout's cost is the path's
        assert int8.two_digit_path_chosen() is chosen
    _times(monkeypatch, int8, None, 1.0, 1.0)  # no _weight_int8pack_mm: else dequantize per call
    assert int8.two_digit_path_chosen() is True
    monkeypatch.undo()
    int8.two_digit_path_chosen.cache_clear()
    measured = int8.measure_two_digit_times(size=128, repeats=1)
    assert measured.cost > 0 and min(measured.separate_s, measured.stacked_s) > 0


def test_a_cpu_without_the_packed_kernel_measures_and_loads_the_two_digit_path(monkeypatch):
    """The stacking measurement timed `_weight_int8pack_mm` where the device lacks it: loading failed."""
    from data_plane.model.quant import int8

    monkeypatch.setattr(int8, "has_int8_kernel", lambda device_type: False)
    monkeypatch.setattr(int8, "two_digit_times", functools.cache(int8.measure_two_digit_times))
    int8.two_digit_path_chosen.cache_clear()
    try:
        assert int8.two_digit_times().packed_s is None
        layer = _layer("int8", _weight((32, 64), 12))
        assert layer.two_digit and layer.two_digit_stacked == int8.two_digit_stacks()
        x = torch.randn(5, 64)
        want = layer.reference(x)
        assert ((layer.kernel(x) - want).abs().max() / want.abs().max()) < 1e-4
    finally:
        monkeypatch.undo()
        int8.two_digit_path_chosen.cache_clear()


def test_int8_on_float32_activations_keeps_sixteen_bits_of_each_row(int8_fp32_path):
    int8_fp32_path(True)
    layer = _layer("int8", _weight((64, 256), 10))
    g = torch.Generator().manual_seed(11)
    x = torch.randn(6, 256, generator=g) * torch.tensor([1e-3, 1.0, 1e3, 1e-20, 0.0, 5.0]).unsqueeze(1)
    x[5, 7] = 500.0  # an outlier: the rest of its row is held to 500 / 65024
    got, want = layer.kernel(x), layer.reference(x)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert torch.equal(got[4], torch.zeros(64))  # an all-zero row
    w_abs = layer.dequantize().abs()  # (N, K)
    for row in range(6):
        step = x[row].abs().max() / (127 * 256)  # each element is held to half a step
        bound = (w_abs.sum(dim=1) * step / 2) * 1.01 + 1e-6 * want[row].abs()  # (N,)
        assert ((got[row] - want[row]).abs() <= bound).all(), row


@pytest.mark.parametrize(("fmt", "shape"), CASES)
@pytest.mark.parametrize("int4_name", ["native", "tinygemm"])
def test_packed_weight_reads_back_as_the_pure_torch_quantization(fmt, shape, int4_name, int4_kernel):
    int4_kernel(int4_name)
    w = _weight(shape, 3)
    assert torch.equal(_layer(fmt, w).dequantize(), _canonical(fmt, w))


def test_int8_error_is_within_half_a_step_per_channel():
    w = _weight((96, 160), 4)
    q, scale = quantize_int8(w)
    step = scale.float().unsqueeze(1)  # (N, 1)
    assert q.dtype == torch.int8 and scale.dtype == torch.bfloat16
    assert ((dequantize_int8(q, scale) - w).abs() <= step / 2 * 1.01).all()


def test_int4_error_is_within_half_a_step_per_group():
    w = _weight((48, 256), 5)
    q, scale, offset = quantize_int4(w, 128)
    assert q.max() <= 15 and scale.shape == offset.shape == (48, 2)
    step = scale.float().repeat_interleave(128, dim=1)  # (N, K)
    # Half a step, plus the bfloat16 rounding of the offset (which shifts the whole grid).
    slack = offset.float().abs().repeat_interleave(128, dim=1) * 2**-8
    assert ((dequantize_int4(q, scale, offset) - w).abs() <= step / 2 * 1.01 + slack).all()


@pytest.mark.parametrize(
    ("in_features", "expected"), [(4096, 128), (192, 64), (96, 32), (352, 32), (344, None), (20, None)]
)
def test_int4_group_size_is_128_else_64_else_32_else_none(in_features, expected):
    assert int4_group_size(in_features) == expected


@pytest.mark.parametrize("in_features", [344, 100, 20])
def test_int4_refuses_an_input_dimension_it_cannot_group(in_features):
    with pytest.raises(QuantizationError, match=f"multiple of 32 .*got {in_features}"):
        make_quant_linear("int4", in_features, 64, torch.device("cpu"))


@pytest.mark.parametrize(("fmt", "int4_name"), [("int8", ""), ("int4", "native"), ("int4", "tinygemm")])
def test_a_weight_streamed_in_small_chunks_packs_as_in_one_pass(fmt, int4_name, monkeypatch, int4_kernel):
    if int4_name:
        int4_kernel(int4_name)
    w = _weight((200, 96), 6)
    whole = _layer(fmt, w)
    monkeypatch.setattr(base, "CHUNK_ELEMENTS", 64 * 96)  # 64 rows at a time (int8: 64, int4: 64)
    chunked = _layer(fmt, w)
    for name, buffer in whole.named_buffers():
        assert torch.equal(buffer, dict(chunked.named_buffers())[name]), name


@pytest.mark.parametrize(
    ("fmt", "limit", "int4_name"), [("int4", 0.2, "native"), ("int4", 0.2, "tinygemm"), ("int8", 0.3, "")]
)
def test_resident_bytes_with_scales_and_offsets_stay_under_the_target(fmt, limit, int4_name, int4_kernel):
    if int4_name:
        int4_kernel(int4_name)
    shape = (1024, 2048)
    layer = _layer(fmt, _weight(shape, 7))
    fp32_bytes = shape[0] * shape[1] * 4
    assert layer.resident_bytes <= limit * fp32_bytes


@pytest.mark.parametrize("fmt", FORMATS)
def test_reference_switch_makes_forward_the_reference(fmt):
    layer = _layer(fmt, _weight((40, 64), 8))
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), layer.kernel(x))
    set_reference_kernels(layer, True)
    assert torch.equal(layer(x), layer.reference(x))
    assert not torch.equal(layer.kernel(x), layer.reference(x))  # the two paths differ: the switch is seen
    set_reference_kernels(layer, False)
    assert torch.equal(layer(x), layer.kernel(x))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_weight_of_the_wrong_shape_is_refused(fmt):
    layer = make_quant_linear(fmt, 64, 32, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"expected \[32, 64\]"):
        layer.load_weight(torch.randn(32, 65))


def test_unknown_format_and_lm_head_without_a_format_are_refused(tmp_path):
    with pytest.raises(QuantizationError, match="unknown quantization format 'int3'"):
        QuantSettings("int3")
    with pytest.raises(QuantizationError, match="needs a format"):
        QuantSettings("none", lm_head=True)
    with pytest.raises(ValueError, match="quantize must be one of none, int8, int4"):
        EngineConfig(model_dir=tmp_path, quantize="fp4")
    with pytest.raises(ValueError, match="quantize_lm_head needs"):
        EngineConfig(model_dir=tmp_path, quantize_lm_head=True)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("fmt", "shape"), [*CASES, *((fmt, shape) for fmt in FORMATS for shape in [(4096, 4096), (11008, 4096)])]
)
@pytest.mark.parametrize("num_rows", [1, 7, 32])
def test_cuda_kernel_matches_the_reference(fmt, shape, num_rows):
    device = torch.device("cuda")
    w = _weight(shape, 9)
    layer = make_quant_linear(fmt, shape[1], shape[0], device)
    layer.load_weight(w.to(device))
    x = torch.randn(num_rows, shape[1], device=device, dtype=torch.bfloat16)
    got = layer.kernel(x).float()
    want = x.float() @ _canonical(fmt, w).to(device).T  # the CPU pure-torch quantization as the oracle
    assert ((got - want).abs().max() / want.abs().max()).item() < 2e-2
