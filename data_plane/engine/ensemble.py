"""Ensemble inference: the checks on an ensemble request and the combination of its members' logits.

K members (adapters, or the base model) run as K sequences of one group in lock-step. At each step each
member's next-token distribution is taken at temperature 1 and they are combined with normalized weights

    probs:    p = sum_i w_i softmax(z_i)
    logprobs: log p = log_softmax(sum_i w_i log_softmax(z_i))      (a product of experts)

`combine` returns log p, a row of log-probabilities that the sampler then treats as the request's logits:
greedy takes its argmax, a temperature T samples from p^(1/T) renormalized (softmax(log p / T)), top-k,
top-p and the repetition penalty apply to it, and the chosen token's logprob is log p of that token.
"""

from __future__ import annotations

import math

import torch

from data_plane.engine.errors import AdapterLoadError, InvalidRequest
from data_plane.engine.request import Ensemble
from data_plane.engine.validation import rank_of, rank_problem
from openlora.adapter_format import AdapterFormatError
from openlora.artifact import CONFIG_FILE

MAX_ENSEMBLE_MEMBERS = 8
COMBINES = ("probs", "logprobs")


def normalized_weights(ensemble: Ensemble) -> list[float]:
    """The members' weights summing to 1 (validation guarantees a positive sum)."""
    total = math.fsum(member.weight for member in ensemble.members)
    return [member.weight / total for member in ensemble.members]


def combine(logits: torch.Tensor, weights: torch.Tensor | list[float], method: str) -> torch.Tensor:
    """logits (G, K, V) of G ensembles of K members each, weights (G, K) with rows summing to 1 -> log p
    (G, V) float32 of each combined distribution; (K, V) and (K,) give (V,). A member of weight 0 takes no
    part. Any member row holding a NaN or +inf, or only -inf, makes its ensemble's result NaN: the sampler
    then fails that request alone."""
    single = logits.dim() == 2
    logits = (logits.unsqueeze(0) if single else logits).float()  # (G, K, V)
    w = torch.as_tensor(weights, dtype=torch.float32, device=logits.device).reshape(
        logits.shape[:2]
    )  # (G, K)
    top = logits.amax(dim=-1, keepdim=True)  # (G, K, 1): NaN if the row holds one, +inf, or -inf if all are
    bad = (~torch.isfinite(top)).squeeze(-1).any(dim=-1)  # (G,)
    if method == "probs":
        # p = sum_i w_i exp(z_i - m_i) / s_i in one batched product: one exp per logit, one log per token.
        shifted = (logits - top).exp_()  # (G, K, V), each row's top is 1
        scale = w / shifted.sum(dim=-1)  # (G, K): w_i / s_i
        p = torch.bmm(scale.unsqueeze(1), shifted).squeeze(1)  # (G, V)
        combined = torch.log(p)
        underflow = (p == 0).any(dim=-1) & ~bad
        if underflow.any():
            # Some token lies over ~100 nats below every member's top: exp underflowed to 0. Those ensembles
            # are computed in log space, so a high temperature still sees the token's true (tiny) mass.
            rows = logits[underflow]  # (G', K, V)
            exact = torch.logsumexp(torch.log_softmax(rows, dim=-1) + w[underflow].log().unsqueeze(-1), dim=1)
            combined[underflow] = exact
    elif method == "logprobs":
        logp = torch.log_softmax(logits, dim=-1)  # (G, K, V)
        # 0 * -inf is NaN: a weight-0 member adds 0; a token a weighted member rules out (-inf) stays out.
        weighted = torch.where(w.unsqueeze(-1) > 0, logp * w.unsqueeze(-1), 0.0)
        combined = torch.log_softmax(weighted.sum(dim=1), dim=-1)
    else:
        raise ValueError(f"unknown ensemble combine {method!r}")
    combined = torch.where(bad.unsqueeze(-1), float("nan"), combined)
    return combined[0] if single else combined


def validate_ensemble(
    ensemble: Ensemble,
    max_lora_rank: int,
    max_num_seqs: int,
    num_adapter_slots: int,
    num_kv_blocks: int,
    blocks_per_member: int,
    max_num_batched_tokens: int | None = None,
) -> None:
    """Raises InvalidRequest (or AdapterLoadError for a member's files) for an ensemble that can never run:
    K outside [1, 8] or above max_num_seqs or max_num_batched_tokens (its members step together), a member
    named twice, weights non-finite, negative or all zero, more distinct adapters than slots, a member above
    the rank limit, or K members' KV blocks (`blocks_per_member` each, for the longest sequence the request
    may reach) beyond the whole cache."""
    members = ensemble.members
    k = len(members)
    if ensemble.combine not in COMBINES:
        raise InvalidRequest("combine", f"must be one of {', '.join(COMBINES)}, got {ensemble.combine!r}")
    if not 1 <= k <= MAX_ENSEMBLE_MEMBERS:
        raise InvalidRequest("mix", f"an ensemble holds 1 to {MAX_ENSEMBLE_MEMBERS} members, got {k}")
    if k > max_num_seqs:
        raise InvalidRequest("mix", f"an ensemble of {k} members exceeds max_num_seqs={max_num_seqs}")
    if max_num_batched_tokens is not None and k > max_num_batched_tokens:
        # Its members step together, one token each at least: a step budget below K never schedules it,
        # and at the head of the queue it would hold back every request behind it.
        raise InvalidRequest(
            "mix", f"an ensemble of {k} members exceeds max_num_batched_tokens={max_num_batched_tokens}"
        )
    keys = [m.adapter.key if m.adapter is not None else None for m in members]
    if len(set(keys)) != k:
        raise InvalidRequest("mix", "an ensemble names a member twice")
    for i, member in enumerate(members):
        if not math.isfinite(member.weight) or member.weight < 0:
            raise InvalidRequest(f"mix[{i}].weight", f"must be a finite number >= 0, got {member.weight}")
    if not any(member.weight > 0 for member in members):
        raise InvalidRequest("mix", "weights are all zero")
    adapters = [m.adapter for m in members if m.adapter is not None]
    if len(adapters) > num_adapter_slots:
        raise InvalidRequest(
            "mix", f"an ensemble of {len(adapters)} adapters exceeds the {num_adapter_slots} adapter slots"
        )
    if k * blocks_per_member > num_kv_blocks:
        raise InvalidRequest(
            "mix",
            f"{k} members need {k * blocks_per_member} KV blocks at full length; the cache holds {num_kv_blocks}",
        )
    for i, ref in enumerate(members):
        if ref.adapter is None:
            continue
        try:
            rank = rank_of(ref.adapter)
        except AdapterFormatError as e:
            raise AdapterLoadError(f"mix[{i}].{e.field}", e.reason) from None
        except OSError:
            raise AdapterLoadError(f"mix[{i}].adapter", f"has no readable {CONFIG_FILE}") from None
        if rank > max_lora_rank:
            raise AdapterLoadError(f"mix[{i}].adapter", rank_problem(rank, max_lora_rank))
