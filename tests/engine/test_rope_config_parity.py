"""RoPE settings of `config.json` are read with the precedence transformers gives them, so the engine
serves transformers' tokens: llama3 RoPE without `original_max_position_embeddings` takes
`max_position_embeddings` (it took 8192); a legacy `rope_scaling` beside `rope_parameters` replaces it
whole (it was ignored); a top-level `original_max_position_embeddings` wins over the one inside (it was
ignored); a YaRN key set to null reads as transformers reads it (a null `truncate` was read as true, a
null factor or optional key was refused). RoPE transformers cannot build is refused, naming the key."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from data_plane.model.config import ModelConfig
from data_plane.model.llama import rope_inv_freq
from openlora.base_model import UnsupportedModelError

from .conftest import TINY_SHAPE, TinyModel, greedy, make_engine, run_to_completion
from .reference import load_reference, reference_greedy

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
TINY = {**TINY_SHAPE, "max_position_embeddings": 256}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(31)
    model_dir = tmp_path_factory.mktemp("rope") / "llama"
    config = LlamaConfig(
        **TINY, initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=None
    )
    LlamaForCausalLM(config).save_pretrained(model_dir)
    return model_dir


def _with_config(source: Path, out: Path, **changes) -> TinyModel:
    """A copy of the checkpoint at `source` whose config.json has `changes` applied."""
    shutil.copytree(source, out)
    path = out / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return TinyModel(out, {}, TINY["vocab_size"])


def _assert_serves_like_transformers(model: TinyModel) -> None:
    reference = load_reference(model.model_dir)
    engine = make_engine(model)
    torch.testing.assert_close(rope_inv_freq(engine.model_config), reference.model.rotary_emb.inv_freq)
    rng = random.Random(5)
    prompts = {f"p{n}": [rng.randrange(model.vocab_size) for _ in range(n)] for n in (5, 40)}
    for request_id, prompt in prompts.items():
        engine.add_request(greedy(request_id, prompt, max_tokens=6))
    results = run_to_completion(engine)
    for request_id, prompt in prompts.items():
        assert results[request_id][0] == reference_greedy(reference, prompt, max_tokens=6)[0], request_id


def test_llama3_rope_without_an_original_length_uses_max_position_embeddings(llama_dir, tmp_path):
    model = _with_config(llama_dir, tmp_path / "m", max_position_embeddings=64, rope_parameters=LLAMA3)
    assert ModelConfig.from_dir(model.model_dir).rope_scaling.original_max_position_embeddings == 64
    _assert_serves_like_transformers(model)


def test_a_legacy_rope_scaling_beside_rope_parameters_replaces_it_theta_included(llama_dir, tmp_path):
    model = _with_config(
        llama_dir,
        tmp_path / "m",
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        rope_scaling={"type": "linear", "factor": 4.0},
    )
    config = ModelConfig.from_dir(model.model_dir)
    assert (config.rope_theta, config.rope_scaling.rope_type) == (10000.0, "linear")
    _assert_serves_like_transformers(model)


def test_a_top_level_original_length_wins_over_the_one_inside(llama_dir, tmp_path):
    model = _with_config(
        llama_dir,
        tmp_path / "m",
        original_max_position_embeddings=16,
        rope_parameters={**LLAMA3, "original_max_position_embeddings": 256},
    )
    _assert_serves_like_transformers(model)


@pytest.mark.parametrize("factor", [2.0, 1.7])
def test_dynamic_rope_is_served_as_transformers_serves_it_up_to_max_position_embeddings(
    llama_dir, tmp_path, factor
):
    """transformers' dynamic NTK RoPE rescales only past max_position_embeddings, which the engine never
    serves: up to there its tokens are the default RoPE's (such checkpoints were refused at startup)."""
    model = _with_config(
        llama_dir, tmp_path / "dynamic", rope_scaling={"rope_type": "dynamic", "factor": factor}
    )
    _assert_serves_like_transformers(model)


@pytest.mark.parametrize(
    "yarn",
    [
        {"factor": 4.0, "original_max_position_embeddings": 32},
        {"factor": 2.0, "beta_fast": 16, "beta_slow": 2, "truncate": False},
        {"factor": 8.0, "original_max_position_embeddings": 16, "mscale": 0.707, "mscale_all_dim": 1.0},
        {"factor": 3.0, "attention_factor": 1.25, "beta_fast": 0},
    ],
)
def test_yarn_rope_is_served_as_transformers_serves_it(llama_dir, tmp_path, yarn):
    """YaRN (Qwen2.5's and others' long-context setting) was refused at startup; its frequencies and the
    attention factor on cos and sin are now computed as transformers computes them."""
    model = _with_config(llama_dir, tmp_path / "yarn", rope_scaling={"rope_type": "yarn", **yarn})
    assert ModelConfig.from_dir(model.model_dir).rope_scaling.rope_type == "yarn"
    _assert_serves_like_transformers(model)
    _assert_rope_tables_like_transformers(model)


@pytest.mark.parametrize(
    "yarn",
    [
        # transformers skips the rounding of the correction range (`if truncate:`): it was rounded
        {"factor": 4.0, "original_max_position_embeddings": 32, "truncate": None},
        # transformers takes max_position_embeddings / original_max_position_embeddings (256 / 32)
        {"factor": None, "original_max_position_embeddings": 32},
        # 32 and 1, and the attention factor computed from the factor, as when absent
        {"factor": 4.0, "beta_fast": None, "beta_slow": None},
        {"factor": 4.0, "attention_factor": None, "mscale": None, "mscale_all_dim": None},
    ],
)
def test_yarn_keys_set_to_null_are_read_as_transformers_reads_them(llama_dir, tmp_path, yarn):
    """transformers builds YaRN from a null optional key (and a null factor), where such configs were
    refused at startup or, for `truncate`, served with other frequencies than transformers'."""
    model = _with_config(llama_dir, tmp_path / "yarn", rope_scaling={"rope_type": "yarn", **yarn})
    _assert_serves_like_transformers(model)
    _assert_rope_tables_like_transformers(model)


def _assert_rope_tables_like_transformers(model: TinyModel) -> None:
    reference = load_reference(model.model_dir)
    positions = torch.arange(64)[None]
    cos, sin = reference.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
    rotary = make_engine(model).runner.model.model.rotary
    assert torch.equal(rotary.cos[:64], cos[0]) and torch.equal(rotary.sin[:64], sin[0])


@pytest.mark.parametrize(
    "changes,key",
    [
        ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "rope_parameters.low_freq_factor"),
        ({"rope_parameters": {"rope_type": "linear"}}, "rope_parameters.factor"),
        (
            {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}},
            "partial",
        ),
        (
            {"original_max_position_embeddings": None, "rope_parameters": LLAMA3},
            "original_max_position_embeddings",
        ),
        (
            {"rope_parameters": {"rope_type": None, "type": "linear", "factor": 2.0}},
            "rope_parameters.rope_type",
        ),
        ({"rope_theta": None}, "config.json.rope_theta"),
        ({"rope_parameters": {"full_attention": {"rope_type": "default"}}}, "rope_parameters.full_attention"),
        ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "rope_scaling.rope_type"),
        ({"rope_scaling": {"rope_type": "yarn", "original_max_position_embeddings": 64}}, "factor"),
        ({"rope_scaling": {"rope_type": "dynamic"}}, "rope_scaling.factor"),
        (
            {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0, "partial_rotary_factor": 0.5}},
            "partial",
        ),
    ],
)
def test_rope_transformers_cannot_build_or_the_engine_lacks_is_refused_naming_the_key(changes, key):
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **TINY, **changes}
    with pytest.raises(UnsupportedModelError, match=key):
        ModelConfig.from_hf_config(config, "llama")
