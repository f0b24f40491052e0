"""AdapterWeights: one adapter's LoRA factors per (layer, projection), ready to copy into a slot."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from data_plane.engine.errors import InvalidRequest


@dataclass
class LoraFactors:
    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scale: float


@dataclass
class AdapterWeights:
    rank: int
    factors: dict[tuple[int, str], LoraFactors]  # (layer, projection) -> factors; absent = no LoRA there

    @property
    def size_bytes(self) -> int:
        return sum(
            f.a.numel() * f.a.element_size() + f.b.numel() * f.b.element_size() for f in self.factors.values()
        )


def linear_mix(members: list[tuple[AdapterWeights, float]], max_rank: int) -> AdapterWeights:
    """sum_i w_i * scale_i * B_i A_i as one composite adapter of rank sum r_i and scale 1.

    A_mix = cat_i(A_i) (rows), B_mix = cat_i(w_i * scale_i * B_i) (columns); a member that leaves a
    projection alone contributes zeros there.
    """
    rank = sum(weights.rank for weights, _ in members)
    if rank > max_rank:
        raise InvalidRequest(
            "mix", f"the mixed adapters' ranks add up to {rank}, above the maximum of {max_rank}"
        )
    keys = sorted({key for weights, _ in members for key in weights.factors})
    factors: dict[tuple[int, str], LoraFactors] = {}
    for key in keys:
        present = [(w.factors[key], weight, w.rank) for w, weight in members if key in w.factors]
        template = present[0][0]
        a_parts, b_parts = [], []
        for weights, weight in members:
            part = weights.factors.get(key)
            if part is None:
                a_parts.append(template.a.new_zeros(weights.rank, template.a.shape[1]))
                b_parts.append(template.b.new_zeros(template.b.shape[0], weights.rank))
            else:
                a_parts.append(part.a)
                b_parts.append((part.b.float() * (weight * part.scale)).to(part.b.dtype))
        factors[key] = LoraFactors(torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1), 1.0)
    return AdapterWeights(rank=rank, factors=factors)
