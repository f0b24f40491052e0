"""QuantLoRALinear: a LoRA projection whose base weights are QuantLinears.

y = Q(x) + b + scale[s] * B[s] (A[s] x): the LoRA pools keep the activation dtype and go through the same
SGMV pass as the full-precision projection; adapters are never merged into the quantized weight. A fused
projection (q|k|v, gate|up) holds one QuantLinear over all its output rows, each slice loaded into its
rows from its own checkpoint tensor as it streams in (one packed matmul, as in full precision); where a
format's packed layout cannot start a slice at its row (int4: slices of multiples of 64 rows), one
QuantLinear per slice, their outputs concatenated.
"""

from __future__ import annotations

import torch
from torch import nn

from data_plane.model.lora_linear import LoRALinear
from data_plane.model.quant.base import QuantLinear, RowSlice


class QuantLoRALinear(LoRALinear):
    def __init__(
        self, linears: list[QuantLinear], out_slices: tuple[int, ...], bias: bool, dtype: torch.dtype
    ) -> None:
        nn.Module.__init__(self)
        self._init_slices(linears[0].in_features, out_slices)
        self.linears = nn.ModuleList(linears)  # one fused, or one per slice
        # Per slice, what its checkpoint tensor loads into: the slice's own QuantLinear, or its rows of the
        # fused one.
        if len(linears) == len(out_slices):
            self.quants: list[QuantLinear | RowSlice] = list(linears)
        else:
            self.quants = [RowSlice(linears[0], start, end - start) for start, end in self.slice_bounds]
        self.activation_dtype = dtype
        self.bias = nn.Parameter(torch.empty(self.out_features), requires_grad=False) if bias else None

    def pool_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        return self.activation_dtype, self.linears[0].device

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.linears) == 1:
            y = self.linears[0](x)  # (T, out)
        else:
            y = torch.cat([linear(x) for linear in self.linears], dim=1)  # (T, out)
        return y if self.bias is None else y + self.bias
