"""Sampler: greedy or temperature/top-k/top-p sampling, repetition penalty, chosen-token logprobs.

Batched over the rows of a step: one max over all rows gives the greedy tokens and tells the unusable rows
apart, the sampled rows are shifted, tempered, filtered and normalised together, and the chosen ids reach
the host in one transfer. Only the random draw is per row, because each row draws from its own request's
generator (so a seeded request's tokens do not depend on its batch).

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


def _on(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a tensor on `device`, copied without waiting for the device's queue."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def apply_repetition_penalties(
    logits: torch.Tensor, rows: list[int], token_ids: list[list[int]], penalties: list[float]
) -> None:
    """In place on logits (N, V): in row rows[j], the tokens of token_ids[j] get penalties[j]. A seen
    token's positive logit is divided by the penalty, a negative one multiplied (as transformers'
    RepetitionPenaltyLogitsProcessor), clamped to +-LOGIT_LIMIT so that an extreme penalty moves a token to
    the very top or bottom instead of to inf. One gather and one scatter for all rows."""
    flat_rows: list[int] = []
    flat_ids: list[int] = []
    flat_penalties: list[float] = []
    for row, ids, penalty in zip(rows, token_ids, penalties, strict=True):
        if penalty == 1.0 or not ids:
            continue
        seen = sorted(set(ids))
        flat_rows += [row] * len(seen)
        flat_ids += seen
        flat_penalties += [_clamp_scalar(penalty)] * len(seen)
    if not flat_ids:
        return
    index = (_on(flat_rows, torch.int64, logits.device), _on(flat_ids, torch.int64, logits.device))
    penalty = _on(flat_penalties, logits.dtype, logits.device)  # (M,): one per (row, seen token)
    values = logits[index]  # (M,)
    penalised = torch.where(values > 0, values / penalty, values * penalty)
    logits[index] = penalised.clamp(-LOGIT_LIMIT, LOGIT_LIMIT)


def apply_repetition_penalty(logits: torch.Tensor, token_ids: list[int], penalty: float) -> None:
    """`apply_repetition_penalties` on one row (V,), in place."""
    apply_repetition_penalties(logits.unsqueeze(0), [0], [token_ids], [penalty])


def filter_top_k_top_p_rows_(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> None:
    """In place on logits (R, V): in row r, every token outside its top_k[r] and outside its top_p[r]
    nucleus is set to -inf. top_k <= 0 or >= V is off; top_p >= 1 is off.

        top-k: keep x where x >= (the k-th largest value of the row)
        top-p: sort the kept tokens by descending logit; drop a token when the tokens before it already
               cover top_p of the probability (so the first one always stays)
    """
    num_rows, vocab = logits.shape
    device = logits.device
    ks = [k if 0 < k < vocab else 0 for k in top_k]
    if any(ks):
        # One topk with the largest k; each row's threshold is its own k-th value (-inf where k is off).
        top_values = torch.topk(logits, max(ks), dim=-1).values  # (R, max k), descending
        k = _on(ks, torch.int64, device)
        threshold = top_values.gather(1, (k - 1).clamp(min=0).unsqueeze(1))  # (R, 1)
        threshold = threshold.masked_fill((k == 0).unsqueeze(1), float("-inf"))
        logits.masked_fill_(logits < threshold, float("-inf"))
    nucleus = [r for r, p in enumerate(top_p) if p < 1.0]
    if nucleus:
        rows = _on(nucleus, torch.int64, device) if len(nucleus) < num_rows else None
        part = logits if rows is None else logits[rows]  # (P, V)
        sorted_logits, sorted_ids = torch.sort(part, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        p = _on([top_p[r] for r in nucleus], logits.dtype, device).unsqueeze(1)  # (P, 1)
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= p
        drop = torch.zeros_like(drop_sorted).scatter_(1, sorted_ids, drop_sorted)  # back to vocab order
        if rows is None:
            logits.masked_fill_(drop, float("-inf"))
        else:
            logits[rows] = part.masked_fill_(drop, float("-inf"))


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """One row (V,) with every token outside the top-k and outside the top-p nucleus set to -inf."""
    logits = logits.clone()
    filter_top_k_top_p_rows_(logits.unsqueeze(0), [top_k], [top_p])
    return logits


def _unusable(row_max: torch.Tensor) -> torch.Tensor:
    """Each row's maximum (N,) -> (N,) bool: the row holds a NaN (max propagates it) or a +inf, or is all
    -inf (nothing to sample)."""
    return ~torch.isfinite(row_max)


def unusable_rows(logits: torch.Tensor) -> list[bool]:
    """logits (N, V) -> per row: True when it holds a NaN or a +inf, or only -inf (nothing to sample)."""
    return _unusable(logits.amax(dim=-1)).tolist()


class Sampler:
    def __call__(
        self,
        logits: torch.Tensor,
        options: list[SamplingOptions],
        generators: list[torch.Generator],
        seen_token_ids: list[list[int]],
    ) -> tuple[list[int | None], list[float | None]]:
        """logits (N, V) -> (chosen token ids (N,), their log-probabilities under the model (N,)).

        The log-probability is that of the model's distribution, before penalty, temperature and
        filtering, and only for rows whose options ask for it (`logprobs`); the other rows get None. Row
        i samples with `generators[i]`, a CPU generator, so a seeded request does not depend on its batch
        nor on the device. A row whose logits are not usable (`unusable_rows`) gets None for both: that
        request must fail, the other rows are unaffected.
        """
        logits = logits.float()
        num_rows, vocab = logits.shape
        device = logits.device
        penalised = [i for i, o in enumerate(options) if o.repetition_penalty != 1.0 and seen_token_ids[i]]
        work = logits
        if penalised:
            work = logits.clone()  # logits stay as the model gave them, for the log-probabilities
            apply_repetition_penalties(
                work,
                penalised,
                [seen_token_ids[i] for i in penalised],
                [options[i].repetition_penalty for i in penalised],
            )
        row_max, chosen = work.max(dim=-1)  # (N,), (N,): the greedy tokens (first of equal maxima)
        unusable = _unusable(logits.amax(dim=-1) if penalised else row_max)

        sampled = [i for i, o in enumerate(options) if o.temperature > 0.0]
        if sampled:
            # Drawn first: on a GPU the host's draws overlap the device's work queued above. A row found
            # unusable later still draws (its request fails; a seeded generator is its request's alone).
            noise = self._draw_exponentials([generators[i] for i in sampled], vocab)
            rows = _on(sampled, torch.int64, device) if len(sampled) < num_rows else None
            x = work if rows is None else work[rows]  # (S, V)
            top = row_max if rows is None else row_max[rows]
            temperature = _on([_clamp_scalar(options[i].temperature) for i in sampled], torch.float32, device)
            # softmax(x / T) == softmax((x - max) / T); shifted, every value is <= 0 and the top one
            # exactly 0, so dividing by any T gives values in [-inf, 0] with a finite top.
            x = (x - top.unsqueeze(1)) / temperature.unsqueeze(1)
            filter_top_k_top_p_rows_(
                x, [options[i].top_k for i in sampled], [options[i].top_p for i in sampled]
            )
            probs = torch.softmax(x, dim=-1)  # (S, V)
            # argmax(p / E) with E ~ Exp(1) i.i.d. draws token t with probability p_t; with E drawn as
            # torch.multinomial(p, 1, generator) draws them, it picks the very token multinomial would.
            picks = probs.div_(noise.to(device, non_blocking=True)).argmax(dim=-1)  # (S,)
            if rows is None:
                chosen = picks
            else:
                chosen[rows] = picks

        chosen = chosen.masked_fill(unusable, -1)
        asked = [i for i, o in enumerate(options) if o.logprobs]
        chosen_logprobs: list[float | None] = [None] * num_rows
        if asked:
            rows = _on(asked, torch.int64, device) if len(asked) < num_rows else None
            part = logits if rows is None else logits[rows]  # (L, V)
            picked = (chosen if rows is None else chosen[rows]).clamp(min=0).unsqueeze(1)  # (L, 1)
            values = torch.log_softmax(part, dim=-1).gather(1, picked).squeeze(1)  # (L,)
        token_ids = [None if t < 0 else t for t in chosen.tolist()]  # the step's one wait for the device
        if asked:
            for i, value in zip(asked, values.tolist(), strict=True):
                if token_ids[i] is not None:
                    chosen_logprobs[i] = value
        return token_ids, chosen_logprobs

    @staticmethod
    def _draw_exponentials(generators: list[torch.Generator], vocab: int) -> torch.Tensor:
        """(S, V) float32 on the CPU: row j is V draws of Exp(1) from generators[j], in row order (a
        generator shared by several rows draws for each in turn)."""
        noise = torch.empty((len(generators), vocab), dtype=torch.float32)
        for row, generator in zip(noise, generators, strict=True):
            row.exponential_(1.0, generator=generator)
        return noise
