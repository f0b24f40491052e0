"""The combination of an ensemble's member logits, and the sampler applied to it: pure tensor math."""

from __future__ import annotations

import pytest
import torch

from data_plane.engine.ensemble import combine
from data_plane.engine.request import SamplingOptions
from data_plane.engine.sampler import Sampler


def _logits(k: int, v: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(k, v, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_probs_is_the_weighted_mean_of_the_member_distributions(k):
    logits = _logits(k, 50, k)
    weights = torch.softmax(torch.arange(k, dtype=torch.float32), dim=0).tolist()
    want = sum(w * torch.softmax(z, dim=-1) for w, z in zip(weights, logits, strict=True))
    got = combine(logits, weights, "probs")
    assert torch.allclose(got.exp(), want, atol=1e-6)
    assert got.exp().sum().item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_logprobs_is_the_renormalized_weighted_product_of_experts(k):
    logits = _logits(k, 50, 10 + k)
    weights = [1.0 / k] * k
    product = torch.ones(50)
    for z in logits:
        product = product * torch.softmax(z, dim=-1) ** (1.0 / k)
    got = combine(logits, weights, "logprobs")
    assert torch.allclose(got.exp(), product / product.sum(), atol=1e-6)


def test_probs_keeps_a_token_that_only_one_member_gives_mass():
    # Member 0 rules token 0 out entirely (a probability far below float32's smallest normal).
    logits = torch.tensor([[-200.0, 0.0, 0.0], [50.0, 0.0, 0.0]])
    got = combine(logits, [0.5, 0.5], "probs")
    assert got[0].item() == pytest.approx(torch.log(torch.tensor(0.5)).item(), abs=1e-5)
    assert torch.isfinite(got).all()


def test_member_of_weight_zero_does_not_count_even_where_it_rules_a_token_out():
    logits = torch.tensor([[0.0, 1.0, 2.0], [float("-inf"), 0.0, 0.0]])
    for method in ("probs", "logprobs"):
        got = combine(logits, [1.0, 0.0], method)
        assert torch.allclose(got, torch.log_softmax(logits[0], dim=-1)), method


def test_a_token_ruled_out_by_a_weighted_member_stays_out_in_the_product():
    logits = torch.tensor([[0.0, 1.0, 2.0], [float("-inf"), 0.0, 0.0]])
    got = combine(logits, [0.5, 0.5], "logprobs")
    assert got[0].item() == float("-inf") and torch.isfinite(got[1:]).all()
    assert got.exp().sum().item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_member_row_makes_the_request_unsampleable(bad):
    logits = _logits(2, 10, 3)
    logits[1, 4] = bad
    for method in ("probs", "logprobs"):
        combined = combine(logits, [0.5, 0.5], method)
        tokens, logprobs = Sampler()(
            combined.unsqueeze(0), [SamplingOptions()], [torch.Generator()], [[1, 2]]
        )
        assert tokens == [None] and logprobs == [None], method


def test_sampler_on_the_combination_draws_from_p_to_the_one_over_t_and_reports_log_p():
    logits = _logits(3, 40, 21)
    weights = [0.2, 0.3, 0.5]
    logp = combine(logits, weights, "probs")
    temperature = 0.6
    options = [SamplingOptions(temperature=temperature, logprobs=True)]
    sampler = Sampler()
    draws = []
    generator = torch.Generator().manual_seed(5)
    reference = torch.Generator().manual_seed(5)
    p_t = logp.exp() ** (1 / temperature)
    p_t = p_t / p_t.sum()
    for _ in range(20):
        (token,), (logprob,) = sampler(logp.unsqueeze(0), options, [generator], [[]])
        assert token == int(torch.multinomial(p_t, 1, generator=reference))
        assert logprob == pytest.approx(logp[token].item(), abs=1e-6)
        draws.append(token)
    assert len(set(draws)) > 1
    (token,), _ = sampler(logp.unsqueeze(0), [SamplingOptions()], [generator], [[]])
    assert token == int(torch.argmax(logp))


def test_unknown_combine_is_an_error():
    with pytest.raises(ValueError, match="vote"):
        combine(_logits(2, 5, 0), [0.5, 0.5], "vote")


@pytest.mark.parametrize("method", ["probs", "logprobs"])
def test_batched_combination_equals_each_ensemble_combined_alone(method):
    logits = _logits(5 * 3, 64, 8).view(5, 3, 64)
    weights = torch.softmax(_logits(5, 3, 9, scale=1.0), dim=-1)
    weights[2] = torch.tensor([0.0, 0.5, 0.5])
    logits[4, 1, 7] = float("nan")  # fails its own ensemble only
    got = combine(logits, weights, method)
    assert got.shape == (5, 64)
    for g in range(4):
        assert torch.allclose(got[g], combine(logits[g], weights[g].tolist(), method), atol=1e-6), g
    assert torch.isnan(got[4]).all()


def test_probs_keeps_the_true_mass_of_a_token_far_below_every_members_top():
    # exp(-250) underflows float32: the token's log-probability is still its exact value, not -inf, so a
    # high temperature still gives it its share.
    logits = torch.tensor([[0.0, -300.0], [0.0, -250.0]])
    got = combine(logits, [0.5, 0.5], "probs")
    assert got[1].item() == pytest.approx(-250.0 + torch.log(torch.tensor(0.5)).item(), abs=1e-3)
    assert got[0].item() == pytest.approx(0.0, abs=1e-6)
