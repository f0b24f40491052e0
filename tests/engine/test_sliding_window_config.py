"""Which layers attend through a sliding window, read per layer as transformers reads them (Qwen2:
`layer_types`, else `use_sliding_window` from `max_window_layers` on; Mistral: every layer whenever
`sliding_window` is set), and the context served: the trained length, never capped at the window."""

from __future__ import annotations

import pytest

from data_plane.model.config import ModelConfig
from openlora.base_model import UnsupportedModelError

COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=512,
)


def _qwen2(**options) -> ModelConfig:
    from transformers import Qwen2Config

    config = Qwen2Config(**COMMON, sliding_window=16, **options).to_dict()
    config["architectures"] = ["Qwen2ForCausalLM"]
    return ModelConfig.from_hf_config(config, "qwen2")


def _transformers_windows(reference) -> tuple[int | None, ...]:
    """Each layer's window as transformers' Qwen2Attention sets it."""
    return tuple(
        reference.sliding_window if kind == "sliding_attention" else None for kind in reference.layer_types
    )


@pytest.mark.parametrize(
    "options,windows",
    [
        (dict(use_sliding_window=False), (None, None, None, None)),
        (dict(use_sliding_window=True, max_window_layers=4), (None, None, None, None)),
        (dict(use_sliding_window=True, max_window_layers=2), (None, None, 16, 16)),
        (dict(use_sliding_window=True, max_window_layers=0), (16, 16, 16, 16)),
        (
            dict(
                use_sliding_window=True,
                layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            ),
            (16, None, 16, None),
        ),
    ],
)
def test_qwen2_windows_are_those_of_the_layers_transformers_slides(options, windows):
    from transformers import Qwen2Config

    assert _transformers_windows(Qwen2Config(**COMMON, sliding_window=16, **options)) == windows
    config = _qwen2(**options)
    assert config.layer_windows == windows
    assert config.max_model_len == 512  # a window does not cap the context served


def test_qwen2_without_layer_types_in_its_file_follows_max_window_layers():
    from transformers import Qwen2Config

    for max_window_layers, want in ((4, (None,) * 4), (3, (None, None, None, 16))):
        config = Qwen2Config(**COMMON, sliding_window=16, use_sliding_window=True).to_dict()
        config.pop("layer_types")
        config.update(architectures=["Qwen2ForCausalLM"], max_window_layers=max_window_layers)
        read = ModelConfig.from_hf_config(config, "qwen2")
        assert (read.layer_windows, read.max_model_len) == (want, 512)


@pytest.mark.parametrize("window,want", [(16, (16,) * 4), (None, (None,) * 4)])
def test_mistral_slides_every_layer_and_is_served_to_its_full_length(window, want):
    from transformers import MistralConfig

    config = MistralConfig(**COMMON, sliding_window=window).to_dict()
    config["architectures"] = ["MistralForCausalLM"]
    read = ModelConfig.from_hf_config(config, "mistral")
    assert (read.layer_windows, read.max_model_len) == (want, 512)


def test_mistral_7b_is_served_to_32768_tokens_with_its_4096_window():
    config = {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "max_position_embeddings": 32768,
        "sliding_window": 4096,
        **{k: v for k, v in COMMON.items() if k != "max_position_embeddings"},
    }
    read = ModelConfig.from_hf_config(config, "mistral")
    assert (read.max_model_len, set(read.layer_windows)) == (32768, {4096})


def test_malformed_layer_types_are_refused_naming_the_field():
    from transformers import Qwen2Config

    config = Qwen2Config(**COMMON).to_dict()
    config.update(architectures=["Qwen2ForCausalLM"], layer_types="sliding_attention")
    with pytest.raises(UnsupportedModelError, match="layer_types"):
        ModelConfig.from_hf_config(config, "qwen2")


@pytest.mark.parametrize(
    "layer_types,message",
    [
        (["full_attention"] * 3, "names 3 layers, the model has 4"),
        (["full_attention"] * 3 + ["chunked_attention"], "chunked_attention"),
    ],
)
def test_layer_types_transformers_cannot_serve_are_refused(layer_types, message):
    # transformers refuses the first at load and has no mask for the second in Qwen2
    from transformers import Qwen2Config

    config = Qwen2Config(**COMMON, sliding_window=16, use_sliding_window=True).to_dict()
    config.update(architectures=["Qwen2ForCausalLM"], layer_types=layer_types)
    with pytest.raises(UnsupportedModelError, match=f"layer_types.*{message}"):
        ModelConfig.from_hf_config(config, "qwen2")


def test_legacy_attention_layer_type_reads_as_full_attention():
    from transformers import Qwen2Config

    types = ["attention", "sliding_attention", "attention", "sliding_attention"]
    reference = Qwen2Config(**COMMON, sliding_window=16, use_sliding_window=True, layer_types=types)
    config = Qwen2Config(**COMMON, sliding_window=16, use_sliding_window=True).to_dict()
    config.update(architectures=["Qwen2ForCausalLM"], layer_types=types)
    assert ModelConfig.from_hf_config(config, "qwen2").layer_windows == _transformers_windows(reference)
