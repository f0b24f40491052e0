"""A checkpoint whose tensors lack the base model's `model.` prefix (saved from `LlamaModel` alone, or
converted by a tool that drops it: `embed_tokens.weight`, `layers.0.self_attn.q_proj.weight`,
`norm.weight`) is loaded as transformers loads it, each name read as its `model.`-prefixed form
(`lm_head.weight` keeps its own); it was refused at startup as an unexpected tensor. A tensor stored under
both names is refused rather than one copy silently winning."""

from __future__ import annotations

import json
import random
import shutil

import pytest
from safetensors.torch import load_file, save_file

from data_plane.model.loader import CheckpointError

from .conftest import TinyModel, greedy, make_engine, run_to_completion
from .reference import load_reference, reference_greedy


def _unprefixed(model: TinyModel, tmp_path, name: str, tied: bool) -> TinyModel:
    model_dir = tmp_path / name
    shutil.copytree(model.model_dir, model_dir)
    tensors = load_file(model_dir / "model.safetensors")
    if tied:  # what LlamaModel.save_pretrained writes: no lm_head, no prefix
        tensors.pop("lm_head.weight", None)
        config = json.loads((model_dir / "config.json").read_text())
        config["tie_word_embeddings"] = True
        (model_dir / "config.json").write_text(json.dumps(config))
    renamed = {key.removeprefix("model."): value.contiguous() for key, value in tensors.items()}
    save_file(renamed, model_dir / "model.safetensors", metadata={"format": "pt"})
    return TinyModel(model_dir, {}, model.vocab_size)


@pytest.mark.parametrize("tied", [False, True])
def test_a_checkpoint_without_the_model_prefix_is_served_as_transformers_serves_it(
    tiny_llama, tmp_path, tied
):
    model = _unprefixed(tiny_llama, tmp_path, "unprefixed", tied)
    rng = random.Random(8)
    prompts = {f"p{n}": [rng.randrange(model.vocab_size) for _ in range(n)] for n in (1, 6, 19)}
    engine = make_engine(model)
    for request_id, prompt in prompts.items():
        engine.add_request(greedy(request_id, prompt, max_tokens=8))
    results = run_to_completion(engine)
    reference = load_reference(model.model_dir)
    for request_id, prompt in prompts.items():
        assert results[request_id][0] == reference_greedy(reference, prompt, 8)[0], request_id


def test_a_tensor_stored_with_and_without_the_prefix_is_refused_naming_it(tiny_llama, tmp_path):
    model_dir = tmp_path / "both"
    shutil.copytree(tiny_llama.model_dir, model_dir)
    tensors = load_file(model_dir / "model.safetensors")
    tensors["norm.weight"] = tensors["model.norm.weight"] + 1
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight'.*stored twice"):
        make_engine(TinyModel(model_dir, {}, tiny_llama.vocab_size))
