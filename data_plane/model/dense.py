"""The matmul of the full-precision linears (the projections' base weights and lm_head), chosen once per
model at load.

On the CPU in float32 (`OPENLORA_KERNELS` auto) it is oneDNN's inner product (`torch.ops.mkldnn.
_linear_pointwise`, the op torch's own compiler emits for CPU linears) instead of `F.linear`, which goes
to the BLAS torch was built with (MKL). At a decode step's shapes (tens to a hundred rows against a
512-4096 wide weight, and lm_head's 32,000 rows) MKL's path ran at about half oneDNN's rate on a 2-core
AMD EPYC (`python -m benchmarks.linear_shapes` times both on the model's shapes). Everything else, and
`OPENLORA_KERNELS=reference`, keeps `F.linear`. The two differ by float rounding (the order in which a
row's products are summed), not by more: oneDNN is checked against `F.linear` on random problems the
first time it is chosen, and a build whose op is missing or disagrees keeps `F.linear` (logged once).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

log = logging.getLogger(__name__)

# (x (..., in), weight (out, in), bias (out,) or None) -> (..., out)
DenseMatmul = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]

TORCH = "torch"
ONEDNN = "onednn"


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias through oneDNN's inner product (float32 CPU tensors)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [None], "")


def dense_matmul(device: torch.device, dtype: torch.dtype, reference: bool) -> tuple[DenseMatmul, str]:
    """The matmul a model on `device` computing in `dtype` uses for its full-precision linears, and its
    name: oneDNN's on the CPU in float32 unless `reference` (OPENLORA_KERNELS=reference) or oneDNN is
    unusable here; `F.linear` otherwise."""
    if reference or torch.device(device).type != "cpu" or dtype != torch.float32:
        return F.linear, TORCH
    problem = onednn_problem()
    if problem is not None:
        return F.linear, TORCH
    return onednn_linear, ONEDNN


@functools.cache
def onednn_problem() -> str | None:
    """Why oneDNN's inner product cannot serve this process's float32 CPU linears (None when it can).
    Checked once: the op exists and agrees with `F.linear` within float32 rounding on random problems
    (with and without bias, one row and many, a strided input, no rows at all)."""
    try:
        problem = _check_onednn()
    except (AttributeError, RuntimeError) as error:  # the op is missing from this torch, or refuses to run
        problem = f"{type(error).__name__}: {str(error)[:200]}"
    if problem is not None:
        log.warning("oneDNN's matmul is not used for the CPU linears (F.linear serves them): %s", problem)
    return problem


def _check_onednn() -> str | None:
    if not torch.backends.mkldnn.is_available():
        return "torch was built without oneDNN"
    # device named: the first call may come while a model is built under torch.device("meta")
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(72, 160, generator=g, device="cpu")
    bias = torch.randn(72, generator=g, device="cpu")
    inputs = {
        "one row": torch.randn(1, 160, generator=g, device="cpu"),
        "many rows": torch.randn(37, 160, generator=g, device="cpu"),
        "a strided input": torch.randn(9, 320, generator=g, device="cpu")[:, ::2],
        "no rows": torch.randn(0, 160, generator=g, device="cpu"),
    }
    for name, x in inputs.items():
        for b in (None, bias):
            expected = F.linear(x, weight, b)
            got = onednn_linear(x, weight, b)
            if got.shape != expected.shape or got.dtype != expected.dtype:
                return f"{name}: shape {list(got.shape)} {got.dtype}, expected {list(expected.shape)} {expected.dtype}"
            # 160 products per output: float32 sums in any order agree to about 1e-5 of their magnitudes.
            if not torch.allclose(got, expected, rtol=1e-4, atol=1e-4):
                return f"{name}: differs from F.linear by {(got - expected).abs().max().item():.3g}"
    return None


class DenseLinear(nn.Module):
    """y = x @ W.T through the model's dense matmul (lm_head in full precision); `weight` loads by name."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.dense_matmul: DenseMatmul = F.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_matmul(x, self.weight, None)


def use_dense_matmul(model: nn.Module, matmul: DenseMatmul) -> None:
    """Makes every full-precision linear of `model` (each module with a `dense_matmul`) compute with it."""
    for module in model.modules():
        if hasattr(module, "dense_matmul"):
            module.dense_matmul = matmul
