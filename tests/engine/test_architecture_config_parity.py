"""`config.json` is read per architecture as transformers reads it, so the engine serves transformers'
tokens: an absent key takes the default of that architecture's config class (Mistral: 8 KV heads, a
4096-token window, 131072 positions; Qwen2: 32 KV heads, 32768 positions, windows from layer 28 on),
where Llama's defaults were used for all three; a flag the architecture's code ignores is ignored
(Mistral's and Qwen2's `attention_bias` and `mlp_bias`, Llama's `sliding_window`), where such checkpoints
were refused naming a missing bias; a file with only `model_type` is read as the class it names. What the
engine cannot match is refused at startup, naming the key."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from data_plane.model.config import ModelConfig
from data_plane.model.loader import CheckpointError
from openlora.base_model import UnsupportedModelError

from .conftest import TINY_SHAPE, TinyModel, greedy, make_engine, run_to_completion
from .reference import load_reference, reference_greedy

TINY = {**TINY_SHAPE, "max_position_embeddings": 256}
CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def _reference_windows(config) -> tuple[int | None, ...]:
    """Each layer's window as transformers attends: LlamaModel builds a causal mask only; Mistral slides
    every layer by `sliding_window`; Qwen2 and Qwen3 the layers their `layer_types` mark."""
    if config.model_type == "llama":
        return (None,) * config.num_hidden_layers
    if config.model_type == "mistral":
        return (config.sliding_window,) * config.num_hidden_layers
    return tuple(config.sliding_window if t == "sliding_attention" else None for t in config.layer_types)


def _assert_reads_like(config: ModelConfig, reference) -> None:
    spec = config.spec
    assert (spec.vocab_size, spec.hidden_size, spec.intermediate_size, spec.num_layers) == (
        reference.vocab_size,
        reference.hidden_size,
        reference.intermediate_size,
        reference.num_hidden_layers,
    )
    assert (spec.num_attention_heads, spec.num_key_value_heads) == (
        reference.num_attention_heads,
        reference.num_key_value_heads,
    )
    assert spec.head_dim == getattr(
        reference, "head_dim", reference.hidden_size // reference.num_attention_heads
    )
    assert config.max_position_embeddings == reference.max_position_embeddings
    assert config.layer_windows == _reference_windows(reference)
    assert config.max_model_len == reference.max_position_embeddings
    assert config.rms_norm_eps == reference.rms_norm_eps
    assert config.tie_word_embeddings == reference.tie_word_embeddings
    assert (config.rope_theta, config.rope_scaling.rope_type) == (
        reference.rope_parameters["rope_theta"],
        reference.rope_parameters["rope_type"],
    )


# Dimensions given, every other key left to the defaults (32 heads, so Qwen2's 32 KV heads fit).
DIMS = dict(
    hidden_size=256, intermediate_size=128, num_hidden_layers=2, num_attention_heads=32, vocab_size=256
)


@pytest.mark.parametrize(
    "model_type,keys",
    [
        ("llama", {}),
        ("mistral", {}),
        ("qwen2", {}),
        ("qwen2", {"use_sliding_window": True, "num_hidden_layers": 30}),  # max_window_layers 28: windows
        ("qwen2", {"use_sliding_window": True, "num_hidden_layers": 28}),  # none from layer 28 on
        ("mistral", {"sliding_window": None}),
        ("llama", {"sliding_window": 16}),  # LlamaModel never slides
        ("qwen2", {"num_key_value_heads": None}),
        ("qwen3", {}),  # head_dim 128 of its own, not hidden_size / heads
        ("qwen3", {"use_sliding_window": True, "num_hidden_layers": 30}),
        ("qwen3", {"head_dim": 16}),
    ],
)
def test_absent_keys_take_the_defaults_of_the_architectures_config_class(model_type, keys):
    from transformers import AutoConfig

    settings = {**DIMS, **keys}
    config = ModelConfig.from_hf_config(
        {"architectures": [CLASSES[model_type]], "model_type": model_type, **settings}, model_type
    )
    _assert_reads_like(config, AutoConfig.for_model(model_type, **settings))


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_a_config_of_only_model_type_reads_as_transformers_reads_it(model_type):
    from transformers import AutoConfig

    config = ModelConfig.from_hf_config({"model_type": model_type}, model_type)
    assert config.spec.architecture == CLASSES[model_type]
    _assert_reads_like(config, AutoConfig.for_model(model_type))


@pytest.mark.parametrize(
    "model_type,flags",
    [
        ("llama", {"attention_bias": True}),
        ("llama", {"mlp_bias": True}),
        ("mistral", {"attention_bias": True, "mlp_bias": True}),
        ("qwen2", {}),
        ("qwen2", {"attention_bias": False, "mlp_bias": True}),
        ("qwen3", {}),
        ("qwen3", {"attention_bias": True, "mlp_bias": True}),
    ],
)
def test_biases_are_those_the_architectures_code_builds(model_type, flags):
    from transformers import AutoConfig, AutoModelForCausalLM

    layer = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **TINY, **flags)).model.layers[
        0
    ]
    config = ModelConfig.from_hf_config(
        {"architectures": [CLASSES[model_type]], "model_type": model_type, **TINY, **flags}, model_type
    )
    attention, mlp = layer.self_attn, layer.mlp
    assert config.qkv_bias == all(
        p.bias is not None for p in (attention.q_proj, attention.k_proj, attention.v_proj)
    )
    assert config.o_bias == (attention.o_proj.bias is not None)
    assert config.mlp_bias == all(p.bias is not None for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))


def _write(out: Path, model_type: str, edit, **overrides) -> TinyModel:
    """A random checkpoint saved by transformers, its config.json then edited by `edit(dict)`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = {**TINY, "initializer_range": 0.1, "bos_token_id": None, "eos_token_id": None, **overrides}
    torch.manual_seed(41)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **settings))
    with torch.no_grad():  # biases start at zero: make them count
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.2)
    model.save_pretrained(out)
    path = out / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    return TinyModel(out, {}, settings["vocab_size"])


SERVED = {
    "mistral without num_key_value_heads (MistralConfig: 8)": (
        "mistral",
        lambda c: c.pop("num_key_value_heads"),
        dict(hidden_size=128, num_attention_heads=16, num_key_value_heads=8, head_dim=8, sliding_window=None),
    ),
    "mistral with attention_bias and mlp_bias set": (
        "mistral",
        lambda c: c.update(attention_bias=True, mlp_bias=True),
        dict(sliding_window=None),
    ),
    "qwen2 with mlp_bias set and attention_bias unset": (
        "qwen2",
        lambda c: c.update(attention_bias=False, mlp_bias=True),
        {},
    ),
    "qwen3 with attention_bias, mlp_bias ignored": (
        "qwen3",
        lambda c: c.update(mlp_bias=True),
        dict(attention_bias=True, head_dim=8),
    ),
    "qwen3 sliding from layer 1 (max_window_layers)": (
        "qwen3",
        lambda c: c.pop("layer_types"),
        dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
    ),
    "llama with model_type and no architectures": ("llama", lambda c: c.pop("architectures"), {}),
    # transformers' ACT2FN maps "swish" to SiLU, the activation every served architecture computes
    "llama with hidden_act swish": ("llama", lambda c: c.update(hidden_act="swish"), {}),
}


@pytest.mark.parametrize("case", list(SERVED))
def test_checkpoints_transformers_serves_are_served_with_its_tokens(tmp_path, case):
    model_type, edit, overrides = SERVED[case]
    model = _write(tmp_path / "model", model_type, edit, **overrides)
    engine = make_engine(model)
    rng = random.Random(9)
    prompts = {f"p{n}": [rng.randrange(model.vocab_size) for _ in range(n)] for n in (4, 23)}
    for request_id, prompt in prompts.items():
        engine.add_request(greedy(request_id, prompt, max_tokens=6))
    results = run_to_completion(engine)
    reference = load_reference(model.model_dir)
    for request_id, prompt in prompts.items():
        assert results[request_id][0] == reference_greedy(reference, prompt, max_tokens=6)[0], request_id


def test_a_bias_tensor_the_architecture_has_no_place_for_is_refused_at_startup(tmp_path):
    def as_mistral(config: dict) -> None:
        config.update(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=None)

    # transformers' Mistral drops these q/k/v/o biases; serving them or dropping them silently would both hide it
    model = _write(tmp_path / "model", "llama", as_mistral, attention_bias=True)
    with pytest.raises(CheckpointError, match=r"unexpected tensor .*bias.*MistralForCausalLM"):
        make_engine(model)


@pytest.mark.parametrize(
    "model_type,changes,key",
    [
        ("mistral", {"sliding_window": 0}, "sliding_window"),
        ("mistral", {"num_key_value_heads": None}, "num_key_value_heads"),
        ("qwen2", {"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
        ("qwen2", {"num_key_value_heads": "absent"}, "num_key_value_heads.*Qwen2Config.*32"),
        ("qwen2", {"head_dim": None}, "head_dim"),
        ("qwen3", {"head_dim": None}, "head_dim.*Qwen3Config"),
        ("qwen3", {"attention_bias": None}, "attention_bias"),
        ("qwen3", {"layer_types": ["full_attention", "chunked_attention"]}, "layer_types.*Qwen3ForCausalLM"),
        ("llama", {"rms_norm_eps": None}, "rms_norm_eps"),
        ("llama", {"architectures": ["MistralForCausalLM"]}, "architectures.*model_type 'llama'"),
        ("llama", {"model_type": "gemma"}, "model_type"),
        ("llama", {"hidden_act": "gelu"}, "hidden_act"),
        # transformers fails on these at load or at the first forward; refused here before serving anything
        ("llama", {"num_attention_heads": 6, "num_key_value_heads": 4}, "num_key_value_heads.*divide"),
        ("qwen2", {"num_attention_heads": 4, "num_key_value_heads": 3}, "num_key_value_heads.*divide"),
        ("llama", {"head_dim": 9}, "head_dim.*even"),
        ("mistral", {"hidden_size": 36, "num_attention_heads": 4, "head_dim": "absent"}, "head_dim.*even"),
    ],
)
def test_configs_the_engine_cannot_match_are_refused_naming_the_key(model_type, changes, key):
    config = {"architectures": [CLASSES[model_type]], "model_type": model_type, **TINY, **changes}
    config = {k: v for k, v in config.items() if v != "absent"}
    with pytest.raises(UnsupportedModelError, match=key):
        ModelConfig.from_hf_config(config, model_type)
