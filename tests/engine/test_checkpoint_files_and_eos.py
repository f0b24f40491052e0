"""Which files of a checkpoint directory are read, and where generation stops, as transformers decides:
`model.safetensors` when there is one (never every `*.safetensors` of the directory), and the EOS ids of
generation_config.json when the checkpoint has one."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from data_plane.model.config import ModelConfig
from data_plane.model.loader import CheckpointError, checkpoint_files

from .conftest import TinyModel, greedy, make_engine, run_to_completion
from .reference import load_reference, reference_greedy


def _copy(model: TinyModel, tmp_path, name: str) -> TinyModel:
    model_dir = tmp_path / name
    shutil.copytree(model.model_dir, model_dir)
    return TinyModel(model_dir, {}, model.vocab_size)


def test_a_second_full_checkpoint_beside_model_safetensors_is_not_read(tiny_llama, tmp_path):
    """An older copy saved beside the checkpoint (same tensor names, other values) sorted after
    model.safetensors and overwrote every tensor: the engine served the old weights."""
    model = _copy(tiny_llama, tmp_path, "two-files")
    old = {name: torch.randn_like(t) for name, t in load_file(model.model_dir / "model.safetensors").items()}
    save_file(old, model.model_dir / "model_old.safetensors")
    assert checkpoint_files(model.model_dir) == [model.model_dir / "model.safetensors"]
    rng = random.Random(4)
    prompts = {f"p{n}": [rng.randrange(model.vocab_size) for _ in range(n)] for n in (5, 12)}
    engine = make_engine(model)
    for request_id, prompt in prompts.items():
        engine.add_request(greedy(request_id, prompt, max_tokens=6))
    results = run_to_completion(engine)
    reference = load_reference(model.model_dir)
    for request_id, prompt in prompts.items():
        assert results[request_id][0] == reference_greedy(reference, prompt, 6)[0]


def test_shards_without_an_index_are_refused_naming_what_is_expected(tiny_llama, tmp_path):
    model = _copy(tiny_llama, tmp_path, "unindexed")
    (model.model_dir / "model.safetensors").rename(model.model_dir / "model-00001-of-00001.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json.*model-00001-of-00001"):
        checkpoint_files(model.model_dir)


@pytest.mark.parametrize(
    ("config_eos", "generation_eos", "has_generation_config"),
    [
        (5, None, True),  # generation_config.json without eos_token_id: generate() does not stop early
        (5, [7, 9], True),
        (5, None, False),  # no generation_config.json: config.json's id
    ],
)
def test_generation_stops_at_the_eos_ids_transformers_stops_at(
    tiny_llama, tmp_path, config_eos, generation_eos, has_generation_config
):
    from transformers import AutoModelForCausalLM

    model = _copy(tiny_llama, tmp_path, "eos")
    config_path = model.model_dir / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "eos_token_id": config_eos}))
    generation_path = model.model_dir / "generation_config.json"
    generation_path.unlink(missing_ok=True)
    if has_generation_config:
        generation = {"bos_token_id": 1}
        if generation_eos is not None:
            generation["eos_token_id"] = generation_eos
        generation_path.write_text(json.dumps(generation))
    want = AutoModelForCausalLM.from_pretrained(model.model_dir).generation_config.eos_token_id
    want = () if want is None else tuple(want) if isinstance(want, list) else (want,)
    assert ModelConfig.from_dir(model.model_dir).eos_token_ids == want
