"""The merge math on its own: DARE's seeded masks (kept fraction, 1/density rescale, reproducible),
the weighted sum on real deltas, the re-factorization's rank and truncation error, the canonical spec."""

from __future__ import annotations

import torch

from data_plane.fusion.merge import (
    EXACT_SVD_MAX_DIM,
    MemberFactors,
    merge_module,
    merged_delta,
    randomized_svd,
    refactorize,
    residual_norm,
)
from data_plane.fusion.spec import MergeSpec

SHA_A, SHA_B, SHA_C = "a" * 64, "b" * 64, "c" * 64


def _member(out_features=256, in_features=512, rank=8, weight=1.0, seed=0, scale=2.0) -> MemberFactors:
    generator = torch.Generator().manual_seed(1000 + seed)
    return MemberFactors(
        a=torch.randn(rank, in_features, generator=generator),
        b=torch.randn(out_features, rank, generator=generator),
        scale=scale,
        weight=weight,
        seed=seed,
    )


def _delta(member: MemberFactors) -> torch.Tensor:
    return member.scale * member.b @ member.a


def test_dare_keeps_density_of_the_values_rescaled_by_one_over_density():
    member = _member(seed=7)
    merged = merged_delta([member], "dare_linear", density=0.3)
    kept = merged != 0
    assert abs(float(kept.float().mean()) - 0.3) < 0.01  # 131072 draws: the std is 0.0013
    torch.testing.assert_close(merged[kept], _delta(member)[kept] / 0.3, rtol=1e-5, atol=1e-5)


def test_dare_masks_are_reproducible_from_the_seed_and_differ_across_seeds():
    first = merged_delta([_member(seed=3)], "dare_linear", density=0.5)
    again = merged_delta([_member(seed=3)], "dare_linear", density=0.5)
    assert torch.equal(first, again)
    other_seed = MemberFactors(**{**_member(seed=3).__dict__, "seed": 4})
    other = merged_delta([other_seed], "dare_linear", density=0.5)
    assert not torch.equal(first != 0, other != 0)


def test_each_members_mask_depends_on_its_own_seed_only():
    x, y = _member(seed=1, weight=0.5), _member(seed=2, weight=2.0)
    together = merged_delta([x, y], "dare_linear", density=0.4)
    alone = (
        merged_delta([x], "dare_linear", density=0.4)  # each alone carries its own weight
        + merged_delta([y], "dare_linear", density=0.4)
    )
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-4)


def test_weighted_sum_is_on_real_deltas_without_cross_terms_or_squared_weights():
    x, y = _member(seed=1, weight=0.6), _member(seed=2, weight=-0.3)
    merged = merged_delta([x, y], "magnitude_prune", density=1.0)
    torch.testing.assert_close(merged, 0.6 * _delta(x) - 0.3 * _delta(y), rtol=1e-5, atol=1e-4)


def test_ties_elects_signs_and_averages_the_agreeing_values():
    x, y = _member(seed=1), _member(seed=2)
    merged = merged_delta([x, y], "ties", density=1.0)
    dx, dy = _delta(x), _delta(y)
    sign = torch.where(dx + dy >= 0, 1.0, -1.0)
    agree_x, agree_y = dx.sign() == sign, dy.sign() == sign
    expected = (dx * agree_x + dy * agree_y) / (agree_x.float() + agree_y.float()).clamp(min=1)
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-4)


def test_refactorized_rank_is_exact_when_the_delta_fits():
    x, y = _member(rank=4, seed=1), _member(rank=8, seed=2)
    merged = merge_module([x, y], "magnitude_prune", 1.0, "total", rank=12, svd_seed=0)
    assert merged.a.shape == (12, 512) and merged.b.shape == (256, 12)
    assert merged.relative_error < 1e-5


def test_truncation_error_is_the_frobenius_residual():
    members = [_member(rank=16, seed=s) for s in range(3)]
    merged = merge_module(members, "ties", 0.5, "total", rank=8, svd_seed=0)
    delta = merged_delta(members, "ties", 0.5)
    expected = float((delta - merged.b @ merged.a).norm() / delta.norm())
    assert abs(merged.relative_error - expected) < 1e-4
    # The best rank-8 approximation (Eckart-Young): the tail of the singular values.
    singular = torch.linalg.svdvals(delta)
    optimal = float(singular[8:].norm() / singular.norm())
    assert abs(merged.relative_error - optimal) < 1e-4


def test_randomized_svd_above_the_exact_limit_is_near_optimal():
    generator = torch.Generator().manual_seed(5)
    rows, cols = EXACT_SVD_MAX_DIM + 76, EXACT_SVD_MAX_DIM + 24
    low_rank = torch.randn(rows, 24, generator=generator) @ torch.randn(24, cols, generator=generator)
    x = low_rank + 0.05 * torch.randn(rows, cols, generator=generator)
    a, b = refactorize(x, 16, seed=1)
    found = residual_norm(x, a, b) / float(x.norm())
    singular = torch.linalg.svdvals(x)
    optimal = float(singular[16:].norm() / singular.norm())
    assert found <= optimal * 1.01 + 1e-6
    u1, s1, v1 = randomized_svd(x, 16, seed=1)
    u2, s2, v2 = randomized_svd(x, 16, seed=1)
    assert torch.equal(s1, s2) and torch.equal(u1, u2) and torch.equal(v1, v2)


def test_spec_is_canonical_in_source_order_and_irrelevant_options():
    one = MergeSpec.of([(SHA_B, 0.4), (SHA_A, 0.6)], "magnitude_prune", 0.5, "frequency")
    two = MergeSpec.of([(SHA_A, 0.6), (SHA_B, 0.4)], "magnitude_prune", 0.5, "total")
    assert one == two and one.seed == two.seed and one.key(64) == two.key(64)
    assert one.majority_sign_method is None  # magnitude pruning elects no sign


def test_spec_key_and_seed_change_with_every_input_that_changes_the_merge():
    base = MergeSpec.of([(SHA_A, 0.6), (SHA_B, 0.4)], "dare_ties", 0.5, "total")
    variants = [
        MergeSpec.of([(SHA_A, 0.6), (SHA_C, 0.4)], "dare_ties", 0.5, "total"),
        MergeSpec.of([(SHA_A, 0.5), (SHA_B, 0.4)], "dare_ties", 0.5, "total"),
        MergeSpec.of([(SHA_A, 0.6), (SHA_B, 0.4)], "dare_linear", 0.5, "total"),
        MergeSpec.of([(SHA_A, 0.6), (SHA_B, 0.4)], "dare_ties", 0.6, "total"),
        MergeSpec.of([(SHA_A, 0.6), (SHA_B, 0.4)], "dare_ties", 0.5, "frequency"),
    ]
    assert len({v.seed for v in [base, *variants]}) == 6
    assert len({v.key(64) for v in [base, *variants]}) == 6
    assert base.key(64) != base.key(32)  # the rank limit changes the artifact, not the masks
    assert base.member_seed(0, "q_proj", SHA_A) != base.member_seed(0, "q_proj", SHA_B)
    assert base.member_seed(0, "q_proj", SHA_A) != base.member_seed(1, "q_proj", SHA_A)


def test_seed_is_a_pure_function_of_the_spec():
    # The same number in every process and after every restart (no hash randomization involved).
    spec = MergeSpec.of([(SHA_A, 0.6), (SHA_B, 0.4)], "dare_linear", 0.5)
    assert spec.canonical_json() == (
        '{"density":0.5,"majority_sign_method":null,"method":"dare_linear",'
        f'"sources":[["{SHA_A}",0.6],["{SHA_B}",0.4]]}}'
    )
    assert spec.seed == MergeSpec.of([(SHA_B, 0.4), (SHA_A, 0.6)], "dare_linear", 0.5).seed
