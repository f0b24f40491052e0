"""Sampler: per-row greedy or temperature/top-k/top-p sampling, repetition penalty, chosen-token logprobs.

Numerically safe for every value validation accepts (any finite temperature >= 0, any finite penalty > 0,
logits as large as an adapter makes them): work happens in float32 on clamped values, and temperature is
applied to logits shifted so that the top one is 0 and the rest negative, so dividing them by a temperature
however small never overflows into inf - inf. A row whose logits are NaN or +inf (or all -inf) samples
nothing: its token is None and that request alone fails.
"""

from __future__ import annotations

import torch

from data_plane.engine.request import SamplingOptions

_FLOAT32 = torch.finfo(torch.float32)
# Penalised logits are clamped here: far beyond any real logit, far below float32's overflow.
LOGIT_LIMIT = 1e30


def _clamp_scalar(value: float) -> float:
    """A positive factor as float32 can hold it: no underflow to 0 nor overflow to inf."""
    return min(max(value, _FLOAT32.tiny), _FLOAT32.max)


def apply_repetition_penalty(logits: torch.Tensor, token_ids: list[int], penalty: float) -> None:
    """In place on one row (V,): seen tokens' positive logits divided by `penalty`, negative multiplied
    (as transformers' RepetitionPenaltyLogitsProcessor), clamped to +-LOGIT_LIMIT so that an extreme
    penalty moves a token to the very top or bottom instead of to inf."""
    if penalty == 1.0 or not token_ids:
        return
    penalty = _clamp_scalar(penalty)
    seen = torch.tensor(sorted(set(token_ids)), dtype=torch.int64, device=logits.device)
    values = logits[seen]
    penalised = torch.where(values > 0, values / penalty, values * penalty)
    logits[seen] = penalised.clamp(-LOGIT_LIMIT, LOGIT_LIMIT)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """One row (V,) with every token outside the top-k and outside the top-p nucleus set to -inf."""
    if top_k > 0 and top_k < logits.numel():
        threshold = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_ids = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens before it already cover top_p (the first one always stays).
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        logits = logits.clone()
        logits[sorted_ids[drop]] = float("-inf")
    return logits


def unusable_rows(logits: torch.Tensor) -> list[bool]:
    """logits (N, V) -> per row: True when it holds a NaN or a +inf, or only -inf (nothing to sample)."""
    nan_or_posinf = torch.isnan(logits) | (logits == float("inf"))
    all_neginf = (logits == float("-inf")).all(dim=-1)
    return (nan_or_posinf.any(dim=-1) | all_neginf).tolist()


class Sampler:
    def __call__(
        self,
        logits: torch.Tensor,
        options: list[SamplingOptions],
        generators: list[torch.Generator],
        seen_token_ids: list[list[int]],
    ) -> tuple[list[int | None], list[float | None]]:
        """logits (N, V) -> (chosen token ids, their log-probabilities under the model (N,)).

        The log-probability is that of the model's distribution, before penalty, temperature and
        filtering. Row i samples with `generators[i]`, so a seeded request does not depend on its batch.
        A row whose logits are not usable (`unusable_rows`) gets None for both: that request must fail,
        the other rows are unaffected.
        """
        logits = logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)  # (N, V)
        unusable = unusable_rows(logits)
        chosen: list[int | None] = []
        for i, opts in enumerate(options):
            if unusable[i]:
                chosen.append(None)
                continue
            row = logits[i]
            if opts.repetition_penalty != 1.0:
                row = row.clone()
                apply_repetition_penalty(row, seen_token_ids[i], opts.repetition_penalty)
            if opts.temperature <= 0.0:
                chosen.append(int(torch.argmax(row)))
                continue
            # softmax(logits / T) == softmax((logits - max) / T); shifted, every value is <= 0 and the
            # top one exactly 0, so dividing by any T gives values in [-inf, 0] with a finite top.
            row = (row - row.max()) / _clamp_scalar(opts.temperature)
            row = filter_top_k_top_p(row, opts.top_k, opts.top_p)
            probs = torch.softmax(row, dim=-1)  # (V,)
            # Request generators live on the CPU, so a seed gives the same tokens on any device; the draw
            # happens where the generator is (torch refuses a generator of another device).
            probs = probs.to(generators[i].device)
            chosen.append(int(torch.multinomial(probs, 1, generator=generators[i])))
        picked = [i for i, token_id in enumerate(chosen) if token_id is not None]
        chosen_logprobs: list[float | None] = [None] * len(chosen)
        if picked:
            rows = torch.tensor(picked, dtype=torch.int64, device=logits.device)
            index = torch.tensor([chosen[i] for i in picked], dtype=torch.int64, device=logits.device)
            for i, value in zip(picked, logprobs[rows, index].tolist(), strict=True):
                chosen_logprobs[i] = value
        return chosen, chosen_logprobs
