"""Ensembles through the engine match a transformers + PEFT reference run step by step.

The reference runs each member (an adapter written by `peft`, or the base model) on the whole sequence at
every step, combines the members' temperature-1 distributions with the normalized weights (probs: the
weighted mean of the probabilities; logprobs: the renormalized weighted sum of log-probabilities), picks
the token (greedy argmax, or a draw from p^(1/T) renormalized with the request's seeded generator) and
appends it to every member. Ensembles run in the same batches as ordinary requests, whose tokens stay
their own.
"""

from __future__ import annotations

import random

import pytest
import torch

from data_plane.engine.errors import AdapterLoadError, InvalidRequest
from data_plane.engine.request import EngineRequest, Ensemble, EnsembleMember, SamplingOptions
from tests.engine.conftest import greedy, make_engine, run_to_completion
from tests.engine.reference import load_reference, reference_greedy
from tests.fusion.merge_support import shared_model

MAX_TOKENS = 12

# request id -> (members as (adapter name or None for the base, weight), combine)
CASES = {
    "k2_probs": ((("r4_qv", 0.7), ("r8_all", 0.3)), "probs"),
    "k3_base_probs": (((None, 0.5), ("r16_rslora", 0.25), ("r8_all", 0.25)), "probs"),
    "k2_base_logprobs": (((None, 1.0), ("r64_all", 3.0)), "logprobs"),
    "k3_logprobs": ((("r4_qv", 2.0), ("r8_all", 1.0), ("r16_rslora", 1.0)), "logprobs"),
}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return shared_model(tmp_path_factory)


@pytest.fixture(scope="module")
def references(model):
    """Adapter name (None: the base model) -> a transformers (+ PEFT) model."""
    names = {name for members, _ in CASES.values() for name, _ in members}
    return {
        name: load_reference(model.model_dir, [model.adapter_dirs[name]] if name else None) for name in names
    }


def _prompt(seed: int, length: int, vocab_size: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab_size) for _ in range(length)]


def _ensemble(model, members, combine: str) -> Ensemble:
    return Ensemble(
        members=tuple(EnsembleMember(model.ref(name) if name else None, weight) for name, weight in members),
        combine=combine,
    )


def _request(model, request_id, prompt, members, combine, **sampling) -> EngineRequest:
    options = SamplingOptions(max_tokens=MAX_TOKENS, logprobs=True, **sampling)
    return EngineRequest(request_id, list(prompt), options, ensemble=_ensemble(model, members, combine))


@torch.no_grad()
def _reference_ensemble(references, members, combine, prompt, temperature=0.0, seed=None):
    """(tokens, combined logprobs of the chosen tokens), recomputing every member on the whole sequence."""
    total = sum(weight for _, weight in members)
    weights = [weight / total for _, weight in members]
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    ids = list(prompt)
    tokens, logprobs = [], []
    for _ in range(MAX_TOKENS):
        member_logps = [
            torch.log_softmax(references[name](torch.tensor([ids])).logits[0, -1].float(), dim=-1)
            for name, _ in members
        ]
        if combine == "probs":
            p = sum(w * lp.exp() for w, lp in zip(weights, member_logps, strict=True))
            logp = p.log()
        else:
            logp = torch.log_softmax(sum(w * lp for w, lp in zip(weights, member_logps, strict=True)), dim=-1)
        if temperature == 0.0:
            token = int(torch.argmax(logp))
        else:
            draw = torch.softmax((logp - logp.max()) / temperature, dim=-1)  # p^(1/T) renormalized
            token = int(torch.multinomial(draw, 1, generator=generator))
        tokens.append(token)
        logprobs.append(float(logp[token]))
        ids.append(token)
    return tokens, logprobs


def test_ensembles_match_the_step_by_step_reference_in_a_batch_with_ordinary_requests(model, references):
    engine = make_engine(model)
    prompts = {rid: _prompt(i, 5 + 4 * i, model.vocab_size) for i, rid in enumerate(CASES)}
    for request_id, (members, combine) in CASES.items():
        engine.add_request(_request(model, request_id, prompts[request_id], members, combine))
    solo_prompt = _prompt(99, 11, model.vocab_size)
    engine.add_request(greedy("solo_r8", solo_prompt, [model.ref("r8_all")], max_tokens=MAX_TOKENS))
    engine.add_request(greedy("solo_base", solo_prompt, max_tokens=MAX_TOKENS))
    results = run_to_completion(engine)

    for request_id, (members, combine) in CASES.items():
        want_tokens, want_logprobs = _reference_ensemble(references, members, combine, prompts[request_id])
        got_tokens, got_logprobs = results[request_id]
        assert got_tokens == want_tokens, request_id
        assert got_logprobs == pytest.approx(want_logprobs, abs=1e-3), request_id
    for request_id, name in (("solo_r8", "r8_all"), ("solo_base", None)):
        want_tokens, want_logprobs = reference_greedy(references[name], solo_prompt, MAX_TOKENS)
        assert results[request_id][0] == want_tokens, request_id
        assert results[request_id][1] == pytest.approx(want_logprobs, abs=1e-3), request_id
    # The group ended whole: every block and adapter reference is back.
    assert engine.scheduler.blocks.num_free_blocks == engine.scheduler.blocks.num_blocks
    assert all(engine.adapter_cache.refcount(model.ref(n).key) == 0 for n in model.adapter_dirs)


def test_groups_preempted_under_kv_pressure_recompute_to_the_same_tokens(model, references):
    # 16 blocks of 4 tokens: each 2-member ensemble reaches 2 x 5 blocks, the solo 5: not all fit at once.
    engine = make_engine(model, block_size=4, num_kv_blocks=16)
    preempted: list[str] = []
    schedule = engine.scheduler.schedule

    def schedule_and_record():
        batch = schedule()
        preempted.extend(seq.request_id for seq in batch.preempted)
        return batch

    engine.scheduler.schedule = schedule_and_record
    prompts = {
        name: _prompt(40 + i, 8, model.vocab_size) for i, name in enumerate(["k2_probs", "k2_base_logprobs"])
    }
    for request_id, prompt in prompts.items():
        members, combine = CASES[request_id]
        engine.add_request(_request(model, request_id, prompt, members, combine))
    solo_prompt = _prompt(50, 8, model.vocab_size)
    engine.add_request(greedy("solo", solo_prompt, [model.ref("r8_all")], max_tokens=MAX_TOKENS))
    results = run_to_completion(engine)

    assert set(preempted) - {"solo"}, "the cache was meant to run out under a group"
    # A group leaves whole: its preempted members are all of it.
    for request_id in set(preempted) - {"solo"}:
        assert preempted.count(request_id) % len(CASES[request_id][0]) == 0
    for request_id, prompt in prompts.items():
        members, combine = CASES[request_id]
        want_tokens, want_logprobs = _reference_ensemble(references, members, combine, prompt)
        assert results[request_id][0] == want_tokens, request_id
        assert results[request_id][1] == pytest.approx(want_logprobs, abs=1e-3), request_id
    assert results["solo"][0] == reference_greedy(references["r8_all"], solo_prompt, MAX_TOKENS)[0]
    assert engine.scheduler.blocks.num_free_blocks == engine.scheduler.blocks.num_blocks


def test_combination_differs_from_each_member_alone(model, references):
    members, combine = CASES["k3_base_probs"]
    prompt = _prompt(7, 9, model.vocab_size)
    engine = make_engine(model)
    engine.add_request(_request(model, "ensemble", prompt, members, combine))
    results = run_to_completion(engine)
    alone = {reference_greedy(references[name], prompt, MAX_TOKENS)[1][0] for name, _ in members}
    combined = results["ensemble"][1][0]
    assert all(abs(combined - logprob) > 1e-4 for logprob in alone)


def test_temperature_samples_from_the_combined_distribution_with_the_request_seed(model, references):
    members, combine = CASES["k2_probs"]
    prompt = _prompt(3, 8, model.vocab_size)
    engine = make_engine(model)
    engine.add_request(_request(model, "hot", prompt, members, combine, temperature=1.7, seed=1234))
    engine.add_request(greedy("other", prompt, [model.ref("r4_qv")]))  # shares the batch, not the seed
    results = run_to_completion(engine)
    want_tokens, want_logprobs = _reference_ensemble(
        references, members, combine, prompt, temperature=1.7, seed=1234
    )
    assert results["hot"][0] == want_tokens
    assert results["hot"][1] == pytest.approx(want_logprobs, abs=1e-3)
    greedy_tokens, _ = _reference_ensemble(references, members, combine, prompt)
    assert want_tokens != greedy_tokens  # the temperature did change the draw


def test_member_of_weight_zero_runs_but_takes_no_part(model, references):
    prompt = _prompt(5, 6, model.vocab_size)
    engine = make_engine(model)
    engine.add_request(_request(model, "e", prompt, (("r8_all", 1.0), ("r64_all", 0.0)), "logprobs"))
    results = run_to_completion(engine)
    want_tokens, want_logprobs = reference_greedy(references["r8_all"], prompt, MAX_TOKENS)
    assert results["e"][0] == want_tokens
    assert results["e"][1] == pytest.approx(want_logprobs, abs=1e-3)


@pytest.mark.parametrize(
    ("members", "overrides", "error", "field"),
    [
        ((("r4_qv", 1.0), ("r4_qv", 1.0)), {}, InvalidRequest, "mix"),
        (((None, 1.0), (None, 1.0)), {}, InvalidRequest, "mix"),
        ((("r4_qv", 0.0), ("r8_all", 0.0)), {}, InvalidRequest, "mix"),
        ((("r4_qv", -1.0), ("r8_all", 1.0)), {}, InvalidRequest, "mix[0].weight"),
        ((("r4_qv", float("nan")), ("r8_all", 1.0)), {}, InvalidRequest, "mix[0].weight"),
        ((("r4_qv", 1.0), ("r8_all", 1.0), (None, 1.0)), {"max_num_seqs": 2}, InvalidRequest, "mix"),
        # Members step together: a step budget of 2 tokens can never schedule 3 of them.
        (
            (("r4_qv", 1.0), ("r8_all", 1.0), (None, 1.0)),
            {"max_num_batched_tokens": 2},
            InvalidRequest,
            "mix",
        ),
        (
            (("r4_qv", 1.0), ("r8_all", 1.0), ("r16_rslora", 1.0)),
            {"num_adapter_slots": 2},
            InvalidRequest,
            "mix",
        ),
        ((("r4_qv", 1.0), ("r64_all", 1.0)), {"max_lora_rank": 16}, AdapterLoadError, "mix[1].adapter"),
        # 3 members of up to 5 + 12 tokens need 2 blocks of 16 each; 5 blocks hold 2 members only.
        ((("r4_qv", 1.0), ("r8_all", 1.0), (None, 1.0)), {"num_kv_blocks": 5}, InvalidRequest, "mix"),
    ],
)
def test_ensemble_that_can_never_run_is_refused_naming_the_field(model, members, overrides, error, field):
    engine = make_engine(model, **overrides)
    with pytest.raises(error) as raised:
        engine.add_request(_request(model, "bad", [1, 2, 3, 4, 5], members, "probs"))
    assert raised.value.field == field
    assert not engine.has_unfinished()


def test_unknown_combine_is_refused(model):
    engine = make_engine(model)
    with pytest.raises(InvalidRequest) as raised:
        engine.add_request(_request(model, "bad", [1, 2, 3], (("r4_qv", 1.0), (None, 1.0)), "vote"))
    assert raised.value.field == "combine"
