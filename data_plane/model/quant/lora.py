"""QuantLoRALinear: a LoRA projection whose base weights are QuantLinears.

y = Q(x) + b + scale[s] * B[s] (A[s] x): the LoRA pools keep the activation dtype and go through the same
SGMV pass as the full-precision projection; adapters are never merged into the quantized weight. A fused
projection (q|k|v, gate|up) holds one QuantLinear per slice, each loaded from its own checkpoint tensor
as it streams in; their outputs are concatenated (its LoRA is fused as in full precision).
"""

from __future__ import annotations

import torch
from torch import nn

from data_plane.model.lora_linear import LoRALinear
from data_plane.model.quant.base import QuantLinear


class QuantLoRALinear(LoRALinear):
    def __init__(self, quants: list[QuantLinear], bias: bool, dtype: torch.dtype) -> None:
        nn.Module.__init__(self)
        self._init_slices(quants[0].in_features, tuple(q.out_features for q in quants))
        self.quants = nn.ModuleList(quants)  # one per slice
        self.activation_dtype = dtype
        self.bias = nn.Parameter(torch.empty(self.out_features), requires_grad=False) if bias else None

    def pool_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        return self.activation_dtype, self.quants[0].device

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.quants) == 1:
            y = self.quants[0](x)  # (T, out)
        else:
            y = torch.cat([quant(x) for quant in self.quants], dim=1)  # (T, out)
        return y if self.bias is None else y + self.bias
