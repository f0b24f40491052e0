"""QuantLoRALinear: a LoRA projection whose base weight is a QuantLinear.

y = Q(x) + b + scale[s] * B[s] (A[s] x): the LoRA pools keep the activation dtype and go through the same
SGMV pass as the full-precision projection; adapters are never merged into the quantized weight.
"""

from __future__ import annotations

import torch
from torch import nn

from data_plane.model.lora_linear import LoRALinear
from data_plane.model.quant.base import QuantLinear


class QuantLoRALinear(LoRALinear):
    def __init__(self, quant: QuantLinear, bias: bool, dtype: torch.dtype) -> None:
        nn.Module.__init__(self)
        self.in_features = quant.in_features
        self.out_features = quant.out_features
        self.quant = quant
        self.activation_dtype = dtype
        self.bias = nn.Parameter(torch.empty(self.out_features), requires_grad=False) if bias else None
        self.lora_a = None
        self.lora_b = None
        self.lora_scale = None

    def pool_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        return self.activation_dtype, self.quant.device

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.quant(x)  # (T, out)
        return y if self.bias is None else y + self.bias
