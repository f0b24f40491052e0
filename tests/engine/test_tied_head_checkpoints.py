"""A config that ties lm_head to the embedding, with a checkpoint that stores an lm_head of its own: served
as transformers serves it (the stored head when it differs from the embedding, one shared tensor when it
is the same); it was silently replaced by the embedding."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from .conftest import TinyModel, greedy, make_engine, run_to_completion
from .reference import load_reference, reference_greedy


def _write(root: Path, name: str, same_head: bool) -> TinyModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(21)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=256,
        initializer_range=0.1,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(config)
    if same_head:
        with torch.no_grad():
            model.lm_head.weight.copy_(model.model.embed_tokens.weight)
    model_dir = root / name
    model.save_pretrained(model_dir)
    path = model_dir / "config.json"
    edited = json.loads(path.read_text())
    edited["tie_word_embeddings"] = True  # as an edited or converted config may say
    path.write_text(json.dumps(edited))
    return TinyModel(model_dir, {}, config.vocab_size)


@pytest.mark.parametrize("same_head", [False, True])
def test_a_stored_head_is_used_as_transformers_uses_it(tmp_path, same_head):
    model = _write(tmp_path, "model", same_head)
    rng = random.Random(3)
    prompts = {f"p{i}": [rng.randrange(model.vocab_size) for _ in range(n)] for i, n in enumerate((4, 11, 7))}
    engine = make_engine(model)
    head, embedding = engine.runner.model.lm_head.weight, engine.runner.model.model.embed_tokens.weight
    assert (head is embedding) == same_head  # tied only when the stored head is the embedding
    for request_id, prompt in prompts.items():
        engine.add_request(greedy(request_id, prompt))
    results = run_to_completion(engine)
    reference = load_reference(model.model_dir)
    for request_id, prompt in prompts.items():
        assert results[request_id][0] == reference_greedy(reference, prompt)[0], request_id


def test_a_tied_checkpoint_storing_only_the_head_is_served_with_it_as_the_embedding(tmp_path):
    """transformers ties the other way when a tied checkpoint stores `lm_head.weight` and no embedding
    (as some exports write it): the embedding is the stored head. Such checkpoints were refused, the
    embedding named missing."""
    from safetensors.torch import load_file, save_file

    model = _write(tmp_path, "model", same_head=True)
    path = model.model_dir / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.embed_tokens.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    engine = make_engine(model)
    assert engine.runner.model.lm_head.weight is engine.runner.model.model.embed_tokens.weight
    prompt = random.Random(4).sample(range(model.vocab_size), 9)
    engine.add_request(greedy("p", prompt))
    assert run_to_completion(engine)["p"][0] == reference_greedy(load_reference(model.model_dir), prompt)[0]
