"""Sampling stays safe for every value validation accepts, and a row with non-finite logits fails alone."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import RepetitionPenaltyLogitsProcessor

from data_plane.engine.errors import NonFiniteLogits
from data_plane.engine.request import AdapterRef, EngineRequest, SamplingOptions
from data_plane.engine.sampler import Sampler, apply_repetition_penalty
from data_plane.engine.validation import adapter_key, validate_request

from .conftest import make_engine

VOCAB = 64
SMALLEST_FLOAT = sys.float_info.min * sys.float_info.epsilon  # 5e-324, the smallest positive double


def _logits(num_rows: int, seed: int = 0, scale: float = 4.0) -> torch.Tensor:
    return torch.randn(num_rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * scale


def _accepted(options: SamplingOptions) -> SamplingOptions:
    """The options, after checking that the engine's validation accepts them."""
    validate_request(EngineRequest("r", [1, 2], options), VOCAB, 128, 8, has_tokenizer=False)
    return options


def _sample(logits: torch.Tensor, options: SamplingOptions, seen: list[int], seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return Sampler()(logits, [options], [generator], [seen])


@pytest.mark.parametrize("temperature", [1e-6, 1e-30, 1e-40, SMALLEST_FLOAT])
def test_temperature_just_above_zero_samples_the_top_token(temperature):
    options = _accepted(SamplingOptions(temperature=temperature, logprobs=True))
    logits = _logits(1, scale=40.0)
    chosen, logprobs = _sample(logits, options, [])
    assert chosen == [int(torch.argmax(logits[0]))]
    assert logprobs[0] == pytest.approx(float(torch.log_softmax(logits[0], -1).max()))


@pytest.mark.parametrize("temperature", [1e30, sys.float_info.max])
def test_huge_temperature_samples_a_token_of_the_vocabulary(temperature):
    options = _accepted(SamplingOptions(temperature=temperature, top_p=0.5, top_k=10))
    chosen, _ = _sample(_logits(1), options, [])
    assert 0 <= chosen[0] < VOCAB


@pytest.mark.parametrize("penalty", [1e-30, 1e-45, SMALLEST_FLOAT])
def test_repetition_penalty_just_above_zero_makes_a_seen_token_win(penalty):
    options = _accepted(SamplingOptions(temperature=1.0, repetition_penalty=penalty, logprobs=True))
    logits = _logits(1)
    seen = [int(i) for i in torch.nonzero(logits[0] > 0).flatten()[:3]]
    chosen, logprobs = _sample(logits, options, seen)
    # Dividing the seen positive logits by ~0 puts them far above every other token.
    assert chosen[0] in seen
    assert logprobs[0] == pytest.approx(float(torch.log_softmax(logits[0], -1)[chosen[0]]))


@pytest.mark.parametrize("penalty", [1e30, 1e300, sys.float_info.max])
def test_huge_repetition_penalty_on_every_token_still_samples(penalty):
    # Every token seen and negative: multiplied by the penalty, all of them overflow towards -inf.
    options = _accepted(SamplingOptions(temperature=0.7, repetition_penalty=penalty))
    logits = -_logits(1).abs() - 0.5
    chosen, _ = _sample(logits, options, list(range(VOCAB)))
    assert 0 <= chosen[0] < VOCAB


def test_huge_repetition_penalty_never_picks_a_seen_positive_token_greedily():
    options = _accepted(SamplingOptions(repetition_penalty=1e300))
    logits = _logits(1)
    top = int(torch.argmax(logits[0]))
    chosen, _ = _sample(logits, options, [top])
    assert chosen[0] != top


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_ordinary_repetition_penalty_matches_transformers(penalty):
    logits = _logits(1)
    seen = [3, 5, 5, 17, 40]
    ours = logits[0].clone()
    apply_repetition_penalty(ours, seen, penalty)
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([seen]), logits.clone())[0]
    torch.testing.assert_close(ours, theirs)


def test_ordinary_temperature_keeps_the_distribution_of_logits_over_temperature():
    logits = _logits(1, scale=2.0)
    options = SamplingOptions(temperature=0.7)
    generator = torch.Generator().manual_seed(1)
    num_draws = 4000
    chosen, _ = Sampler()(
        logits.repeat(num_draws, 1), [options] * num_draws, [generator] * num_draws, [[]] * num_draws
    )
    counts = torch.bincount(torch.tensor(chosen), minlength=VOCAB).float() / num_draws
    expected = torch.softmax(logits[0] / 0.7, -1)
    assert (counts - expected).abs().max() < 0.03


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_non_finite_row_fails_alone_and_the_others_sample_as_they_would_alone(temperature):
    logits = _logits(4, seed=3)
    bad = logits.clone()
    bad[1, 7] = float("nan")
    bad[2, 9] = float("inf")
    bad[3] = float("-inf")
    batch = torch.cat([logits[:1], bad[1:], logits[:1]])  # rows: healthy, NaN, +inf, all -inf, healthy
    options = SamplingOptions(temperature=temperature, seed=5, logprobs=True)
    generators = [torch.Generator().manual_seed(5) for _ in range(5)]
    chosen, logprobs = Sampler()(batch, [options] * 5, generators, [[]] * 5)
    alone, alone_logprobs = _sample(logits[:1], options, [], seed=5)
    assert chosen[1:4] == [None, None, None] and logprobs[1:4] == [None, None, None]
    assert chosen[0] == chosen[4] == alone[0]
    assert logprobs[0] == pytest.approx(alone_logprobs[0]) and logprobs[4] == pytest.approx(alone_logprobs[0])


@pytest.mark.parametrize(
    "options",
    [
        SamplingOptions(temperature=SMALLEST_FLOAT, max_tokens=6),
        SamplingOptions(temperature=1.0, repetition_penalty=SMALLEST_FLOAT, max_tokens=6),
        SamplingOptions(temperature=0.5, repetition_penalty=sys.float_info.max, max_tokens=6),
    ],
)
def test_extreme_sampling_values_run_to_the_end_in_the_engine(tiny_llama, options):
    engine = make_engine(tiny_llama)
    engine.add_request(EngineRequest("x", [1, 2, 3, 1, 2, 3], options))
    outputs = []
    while engine.has_unfinished():
        outputs.extend(engine.step())
    assert [o.error for o in outputs] == [None] * len(outputs)
    assert outputs[-1].finish_reason == "length" and outputs[-1].completion_tokens == 6


def _huge_alpha_adapter(tiny_llama, tmp_path) -> AdapterRef:
    """r8_all with its B factors times 1e30, in float32: finite, accepted, its deltas overflow float32."""
    path = tmp_path / "huge_b"
    shutil.copytree(tiny_llama.adapter_dirs["r8_all"], path)
    weights = path / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v.float() * (1e30 if "lora_B" in k else 1.0) for k, v in tensors.items()}, weights)
    return AdapterRef(key="huge-b", path=path)


@pytest.mark.parametrize("kind", ["adapter", "mix"])
def test_non_finite_logits_fail_that_request_and_its_batch_mates_finish(tiny_llama, tmp_path, kind):
    if kind == "adapter":
        adapters = (_huge_alpha_adapter(tiny_llama, tmp_path),)
    else:
        adapters = (tiny_llama.ref("r4_qv", 1e36), tiny_llama.ref("r8_all", 1e36))
    prompt = [5, 6, 7, 8]
    healthy = SamplingOptions(temperature=1.0, seed=11, max_tokens=8)
    alone = make_engine(tiny_llama)
    alone.add_request(EngineRequest("good", prompt, healthy, (tiny_llama.ref("r8_all"),)))
    want = []
    while alone.has_unfinished():
        want += [t for o in alone.step() for t in o.new_token_ids]

    engine = make_engine(tiny_llama)
    free_blocks = engine.scheduler.blocks.num_free_blocks
    engine.add_request(EngineRequest("bad", prompt, SamplingOptions(temperature=1.0, max_tokens=8), adapters))
    engine.add_request(EngineRequest("good", prompt, healthy, (tiny_llama.ref("r8_all"),)))
    outputs = []
    while engine.has_unfinished():
        outputs.extend(engine.step())
    bad = [o for o in outputs if o.request_id == "bad"]
    assert len(bad) == 1 and bad[0].finish_reason == "abort"
    assert isinstance(bad[0].error, NonFiniteLogits) and bad[0].error.field == kind
    good = [o for o in outputs if o.request_id == "good"]
    assert [t for o in good for t in o.new_token_ids] == want
    assert good[-1].finish_reason == "length" and good[-1].error is None
    assert engine.scheduler.blocks.num_free_blocks == free_blocks
    assert engine.adapter_cache.refcount(adapter_key(adapters)) == 0
