"""The base model alone matches transformers token for token."""

from __future__ import annotations

import random

import pytest

from .conftest import greedy, make_engine, run_to_completion
from .reference import load_reference, reference_greedy


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_qwen2", "tiny_qwen3"])
def test_base_model_greedy_matches_transformers(which, request):
    model = request.getfixturevalue(which)
    rng = random.Random(7)
    prompts = [[rng.randrange(model.vocab_size) for _ in range(n)] for n in (1, 5, 17, 40)]
    engine = make_engine(model)
    for i, prompt in enumerate(prompts):
        engine.add_request(greedy(f"r{i}", prompt))
    results = run_to_completion(engine)
    reference = load_reference(model.model_dir)
    for i, prompt in enumerate(prompts):
        want_tokens, want_logprobs = reference_greedy(reference, prompt)
        got_tokens, got_logprobs = results[f"r{i}"]
        assert got_tokens == want_tokens
        assert got_logprobs == pytest.approx(want_logprobs, abs=1e-3)
