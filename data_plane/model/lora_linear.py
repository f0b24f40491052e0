"""LoRALinear: a projection with preallocated per-slot LoRA pools, applied through SGMV."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

import kernels
from data_plane.model.metadata import LoraSegments


class LoRALinear(nn.Module):
    """y = x @ W.T + b, plus scale[s] * (x @ A[s].T) @ B[s].T for the rows of adapter slot s.

    The pools are allocated once (`allocate_slots`); loading an adapter copies into a slot
    (`load_slot`), zero-padded beyond its rank; nothing is reallocated afterwards.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.lora_a: torch.Tensor | None = None  # (S, R, in)
        self.lora_b: torch.Tensor | None = None  # (S, out, R)
        self.lora_scale: torch.Tensor | None = None  # (S,) float32; 0 where the slot leaves this layer alone

    def pool_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        """The dtype and device of the LoRA slot pools: the activations'."""
        return self.weight.dtype, self.weight.device

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, in) -> x @ W.T + b (T, out): the projection without LoRA."""
        return F.linear(x, self.weight, self.bias)

    def allocate_slots(self, num_slots: int, max_rank: int) -> None:
        dtype, device = self.pool_dtype_device()
        self.lora_a = torch.zeros(num_slots, max_rank, self.in_features, dtype=dtype, device=device)
        self.lora_b = torch.zeros(num_slots, self.out_features, max_rank, dtype=dtype, device=device)
        self.lora_scale = torch.zeros(num_slots, dtype=torch.float32, device=device)

    def load_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None, scale: float) -> None:
        """Copies A (r, in) and B (out, r) into `slot`; None leaves this projection without LoRA."""
        assert self.lora_a is not None and self.lora_b is not None and self.lora_scale is not None
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        if a is None or b is None:
            self.lora_scale[slot] = 0.0
            return
        rank = a.shape[0]
        self.lora_a[slot, :rank].copy_(a)
        self.lora_b[slot, :, :rank].copy_(b)
        self.lora_scale[slot] = scale

    def forward(self, x: torch.Tensor, lora: LoraSegments | None) -> torch.Tensor:
        y = self.base_forward(x)  # (T, out)
        if lora is None or self.lora_a is None:
            return y
        lora_a, lora_b = self.lora_a, self.lora_b
        if lora.max_rank < lora_a.shape[1] and not lora.use_triton:
            # The torch reference computes every pool column; columns past the step's largest rank are
            # zero padding, so leave them out (views, no copy).
            lora_a, lora_b = lora_a[:, : lora.max_rank], lora_b[:, :, : lora.max_rank]
        # The layout is built on the host: passing its longest segment spares the Triton path a device
        # sync per call to check the indices.
        layout = dict(max_segment_rows=lora.max_segment_rows, use_triton=lora.use_triton, plan=lora.plan)
        u = kernels.sgmv_shrink(x, lora_a, lora.seg_indptr, lora.seg_slots, **layout)  # (T, r)
        kernels.sgmv_expand(u, lora_b, lora.seg_indptr, lora.seg_slots, y, self.lora_scale, **layout)
        return y
