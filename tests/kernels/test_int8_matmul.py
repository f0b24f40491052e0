"""The weight-only int8 Triton matmul against dequantize-then-matmul in float32, on odd shapes: rows of
decode and prefill size, input and output dimensions no tile divides, split-K and strided inputs."""

from __future__ import annotations

import pytest
import torch

from openlora_kernels.triton_ops import int8_matmul

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _case(m: int, n: int, k: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = (torch.rand(n, generator=g) * 0.01 + 1e-3).to(torch.bfloat16)
    x = torch.randn(m, k, generator=g)
    expected = x.to(dtype).float() @ (q.float() * scale.float().unsqueeze(1)).T
    return x.to(DEVICE, dtype), q.to(DEVICE), scale.to(DEVICE), expected


def _check(y: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert y.dtype == dtype and y.shape == expected.shape
    # Inputs are exact in the activation dtype; the sums are float32; the output is rounded once.
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}[dtype]
    err = (y.float().cpu() - expected).abs().max().item()
    assert err <= tol * expected.abs().max().item(), err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("m", "n", "k"), [(1, 48, 96), (5, 33, 344), (17, 100, 200), (32, 65, 130), (40, 24, 64)]
)
def test_matches_dequantize_then_matmul(m, n, k, dtype):
    x, q, scale, expected = _case(m, n, k, dtype, seed=m * 1000 + n + k)
    _check(int8_matmul.int8_weight_matmul(x, q, scale), expected, dtype)


def test_split_k_sums_every_part_once():
    # Few output tiles and a long K: the launch splits K, and the parts are reduced after it.
    m, n, k = 2, 16, 2048
    block_k = int8_matmul._tiles(m)[2]
    assert int8_matmul.split_k_for(1, k, block_k) > 1
    x, q, scale, expected = _case(m, n, k, torch.bfloat16, seed=3)
    _check(int8_matmul.int8_weight_matmul(x, q, scale), expected, torch.bfloat16)


def test_many_rows_take_the_dense_path():
    m = int8_matmul.DENSE_MIN_ROWS
    x, q, scale, expected = _case(m, 24, 80, torch.bfloat16, seed=4)
    _check(int8_matmul.int8_weight_matmul(x, q, scale), expected, torch.bfloat16)


def test_strided_rows_and_empty_input():
    x, q, scale, expected = _case(6, 40, 96, torch.bfloat16, seed=5)
    wide = torch.zeros(6, 200, dtype=x.dtype, device=x.device)
    wide[:, 10:106] = x
    _check(int8_matmul.int8_weight_matmul(wide[:, 10:106], q, scale), expected, torch.bfloat16)
    assert int8_matmul.int8_weight_matmul(x[:0], q, scale).shape == (0, 40)


def test_mismatched_shapes_are_refused():
    x, q, scale, _ = _case(2, 8, 32, torch.bfloat16, seed=6)
    with pytest.raises(ValueError, match="do not multiply"):
        int8_matmul.int8_weight_matmul(x[:, :16], q, scale)
    with pytest.raises(ValueError, match="scale"):
        int8_matmul.int8_weight_matmul(x, q, scale[:4])
