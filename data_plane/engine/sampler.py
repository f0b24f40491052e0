"""Sampler: per-row greedy or temperature/top-k/top-p sampling, repetition penalty, chosen-token logprobs."""

from __future__ import annotations

import torch

from data_plane.engine.request import SamplingOptions


def apply_repetition_penalty(logits: torch.Tensor, token_ids: list[int], penalty: float) -> None:
    """In place on one row (V,): seen tokens' positive logits divided by `penalty`, negative multiplied."""
    if penalty == 1.0 or not token_ids:
        return
    seen = torch.tensor(sorted(set(token_ids)), dtype=torch.int64, device=logits.device)
    values = logits[seen]
    logits[seen] = torch.where(values > 0, values / penalty, values * penalty)


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


class Sampler:
    def __call__(
        self,
        logits: torch.Tensor,
        options: list[SamplingOptions],
        generators: list[torch.Generator],
        seen_token_ids: list[list[int]],
    ) -> tuple[list[int], list[float]]:
        """logits (N, V) float32 -> (chosen token ids, their log-probabilities under the model (N,)).

        The log-probability is that of the model's distribution, before penalty, temperature and
        filtering. Row i samples with `generators[i]`, so a seeded request does not depend on its batch.
        """
        logprobs = torch.log_softmax(logits, dim=-1)  # (N, V)
        chosen: list[int] = []
        for i, opts in enumerate(options):
            row = logits[i]
            if opts.repetition_penalty != 1.0:
                row = row.clone()
                apply_repetition_penalty(row, seen_token_ids[i], opts.repetition_penalty)
            if opts.temperature <= 0.0:
                chosen.append(int(torch.argmax(row)))
                continue
            row = filter_top_k_top_p(row / opts.temperature, opts.top_k, opts.top_p)
            probs = torch.softmax(row, dim=-1)  # (V,)
            # Request generators live on the CPU, so a seed gives the same tokens on any device; the draw
            # happens where the generator is (torch refuses a generator of another device).
            probs = probs.to(generators[i].device)
            chosen.append(int(torch.multinomial(probs, 1, generator=generators[i])))
        index = torch.tensor(chosen, dtype=torch.int64, device=logits.device)
        chosen_logprobs = logprobs.gather(1, index.unsqueeze(1)).squeeze(1).tolist()
        return chosen, chosen_logprobs
