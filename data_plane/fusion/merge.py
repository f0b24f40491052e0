"""Merge math on one module: PEFT's `*_svd` combination types on the real deltas, then re-factorized.

For each module the sources' deltas `D_i = s_i * B_i @ A_i` (out, in) are pruned (magnitude: keep the
`density` fraction of largest |values|; DARE: keep each value with probability `density`, rescaled by
1/density), combined (weighted sum; or, for TIES, a sign elected per parameter and the weighted values
of that sign averaged), and the merged delta is factorized by SVD into `B (out, rank) @ A (rank, in)`.

Peak memory is one merged delta (plus, while a magnitude threshold is found, one source's delta): the
sources' deltas are computed a block of rows at a time, so K sources never cost K deltas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Rows per block: about 1M float32 values (4 MiB) per source at a time.
CHUNK_ELEMENTS = 1 << 20
# Up to this smaller side the SVD is exact (LAPACK); above it a seeded randomized SVD with power
# iterations finds the top singular vectors (the exact one costs minutes per 4096 x 14336 module on a CPU).
EXACT_SVD_MAX_DIM = 1024
_OVERSAMPLE = 16
_POWER_ITERATIONS = 4
_MAGNITUDE = ("ties", "magnitude_prune")
_RANDOM = ("dare_linear", "dare_ties")
_ELECTING = ("ties", "dare_ties")


@dataclass(frozen=True)
class MemberFactors:
    """One source's LoRA on one module."""

    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scale: float  # lora_alpha / r (or / sqrt(r) with rsLoRA)
    weight: float
    seed: int  # of this source's DARE mask on this module


@dataclass(frozen=True)
class MergedModule:
    a: torch.Tensor  # (rank, in) float32
    b: torch.Tensor  # (out, rank) float32
    delta_norm: float  # ||D||_F of the merged delta
    error_norm: float  # ||D - B @ A||_F: what the re-factorization lost

    @property
    def relative_error(self) -> float:
        return self.error_norm / self.delta_norm if self.delta_norm > 0 else 0.0


def chunk_rows(in_features: int) -> int:
    """Rows per block; a function of the shape only, so the DARE masks are the same everywhere."""
    return max(1, CHUNK_ELEMENTS // in_features)


def member_delta(member: MemberFactors, rows: slice) -> torch.Tensor:
    """(rows, in) float32 block of `scale * B @ A`, computed as PEFT's get_delta_weight does."""
    return (member.b[rows].float() @ member.a.float()) * member.scale


def magnitude_threshold(member: MemberFactors, density: float) -> float:
    """The smallest |value| the top `int(density * numel)` values of the delta reach (PEFT's top-k);
    +inf when none is kept."""
    out_features, in_features = member.b.shape[0], member.a.shape[1]
    numel = out_features * in_features
    k = int(density * numel)
    if k == 0:
        return math.inf
    step = chunk_rows(in_features)
    magnitudes = torch.empty(numel, dtype=torch.float32)  # one delta, flattened
    for start in range(0, out_features, step):
        block = member_delta(member, slice(start, start + step)).abs()
        magnitudes[start * in_features : start * in_features + block.numel()] = block.reshape(-1)
    # Selected in place (introselect): torch.kthvalue and topk would copy the delta and add int64 indices.
    values = magnitudes.numpy()
    values.partition(numel - k)
    return float(values[numel - k])


def merged_delta(
    members: list[MemberFactors], method: str, density: float, majority_sign_method: str = "total"
) -> torch.Tensor:
    """The merged delta (out, in) float32 of one module, as PEFT's ties / dare_linear / dare_ties /
    magnitude_prune on the members' real deltas (members absent from the module are left out)."""
    if method not in _MAGNITUDE + _RANDOM:
        raise ValueError(f"unknown merge method {method!r}")
    out_features, in_features = members[0].b.shape[0], members[0].a.shape[1]
    prunes = density < 1  # PEFT prunes nothing at density >= 1
    thresholds = (
        [magnitude_threshold(m, density) for m in members] if prunes and method in _MAGNITUDE else None
    )
    generators = (
        [torch.Generator(device="cpu").manual_seed(m.seed) for m in members]
        if prunes and method in _RANDOM
        else None
    )
    merged = torch.empty(out_features, in_features, dtype=torch.float32)
    step = chunk_rows(in_features)
    for start in range(0, out_features, step):
        rows = slice(start, start + step)
        parts = []
        for i, member in enumerate(members):
            part = member_delta(member, rows)  # (rows, in)
            if thresholds is not None:
                part = part * (part.abs() >= thresholds[i])
            if generators is not None:
                keep = torch.rand(part.shape, generator=generators[i]) < density
                part = part * keep / density
            parts.append(part)
        weights = [m.weight for m in members]
        if method in _ELECTING:
            merged[rows] = _disjoint_merge(parts, weights, majority_sign_method)
        else:
            total = parts[0] * weights[0]
            for part, weight in zip(parts[1:], weights[1:], strict=True):
                total += part * weight
            merged[rows] = total
    return merged


def _disjoint_merge(
    parts: list[torch.Tensor], weights: list[float], majority_sign_method: str
) -> torch.Tensor:
    """TIES: elect each parameter's sign on the unweighted values (their sum, or the count of signs), then
    average the weighted values that carry it. K x (rows, in) -> (rows, in)."""
    if majority_sign_method == "total":
        votes = parts[0].clone()
        for part in parts[1:]:
            votes += part
    elif majority_sign_method == "frequency":
        votes = parts[0].sign()
        for part in parts[1:]:
            votes += part.sign()
    else:
        raise ValueError(f"unknown majority_sign_method {majority_sign_method!r}")
    majority = torch.where(votes >= 0, 1.0, -1.0)
    del votes
    total = torch.zeros_like(majority)
    count = torch.zeros_like(majority)
    for part, weight in zip(parts, weights, strict=True):
        agree = part.sign() == majority
        total += part * weight * agree
        count += agree
    return total / count.clamp_(min=1.0)


def refactorize(delta: torch.Tensor, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (rank, in), B (out, rank)) with B @ A the best rank-`rank` approximation of `delta` (out, in):
    B = U_k S_k, A = Vh_k as PEFT's svd merge; zero-padded when the delta has fewer dimensions."""
    out_features, in_features = delta.shape
    k = min(rank, out_features, in_features)
    if min(out_features, in_features) <= EXACT_SVD_MAX_DIM:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    else:
        u, s, vh = randomized_svd(delta, k, seed)
    a = delta.new_zeros(rank, in_features)
    b = delta.new_zeros(out_features, rank)
    a[:k] = vh[:k]
    b[:, :k] = u[:, :k] * s[:k]
    return a, b


def randomized_svd(x: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`k` (U (m, l), S (l,), Vh (l, n)) of x (m, n) by a seeded Gaussian range finder with power
    iterations (Halko, Martinsson, Tropp 2011); l = k + oversampling. U @ diag(S) @ Vh[:k] is the
    orthogonal projection of x onto the found range, so the residual is measured exactly afterwards."""
    m, n = x.shape
    width = min(k + _OVERSAMPLE, m, n)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(n, width, generator=generator, dtype=x.dtype)
    q, _ = torch.linalg.qr(x @ omega)  # (m, l)
    for _ in range(_POWER_ITERATIONS):
        z, _ = torch.linalg.qr(x.T @ q)  # (n, l)
        q, _ = torch.linalg.qr(x @ z)
    u_small, s, vh = torch.linalg.svd(q.T @ x, full_matrices=False)  # (l, l), (l,), (l, n)
    return q @ u_small, s, vh


def residual_norm(delta: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """||delta - b @ a||_F, a block of rows at a time (no second full-size matrix)."""
    step = chunk_rows(delta.shape[1])
    total = 0.0
    for start in range(0, delta.shape[0], step):
        rows = slice(start, start + step)
        total += float(torch.linalg.vector_norm(delta[rows] - b[rows] @ a).double() ** 2)
    return math.sqrt(total)


class NonFiniteMerge(ValueError):
    """A module's merged delta holds inf or NaN, which no factorization can represent."""


def merge_module(
    members: list[MemberFactors],
    method: str,
    density: float,
    majority_sign_method: str,
    rank: int,
    svd_seed: int,
) -> MergedModule:
    """One module merged and re-factorized to `rank`, with the truncation it cost."""
    delta = merged_delta(members, method, density, majority_sign_method)
    if not bool(torch.isfinite(delta).all()):  # weights finite but huge: the sum overflowed float32
        raise NonFiniteMerge(
            "the members' weighted deltas overflow float32 (the mix weights or the adapters' own factors are "
            "too large for this merge)"
        )
    a, b = refactorize(delta, rank, svd_seed)
    norm = float(torch.linalg.vector_norm(delta).double())
    return MergedModule(a=a, b=b, delta_norm=norm, error_norm=residual_norm(delta, a, b))
