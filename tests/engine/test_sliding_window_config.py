"""The context a model is served to: capped at its sliding window only when some layer attends through
one, as transformers decides (Qwen2: `layer_types`, else `use_sliding_window` from `max_window_layers`
on; Mistral: whenever `sliding_window` is set)."""

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


@pytest.mark.parametrize(
    "options,sliding",
    [
        (dict(use_sliding_window=False), False),
        (dict(use_sliding_window=True, max_window_layers=4), False),  # every layer below max_window_layers
        (dict(use_sliding_window=True, max_window_layers=2), True),
        (dict(use_sliding_window=True, max_window_layers=0), True),
    ],
)
def test_qwen2_is_capped_at_its_window_only_when_a_layer_slides(options, sliding):
    from transformers import Qwen2Config

    reference = Qwen2Config(**COMMON, sliding_window=16, **options)
    assert ("sliding_attention" in reference.layer_types) == sliding  # what transformers computes
    config = _qwen2(**options)
    assert config.max_model_len == (16 if sliding else 512)


def test_qwen2_without_layer_types_in_its_file_follows_max_window_layers():
    from transformers import Qwen2Config

    for max_window_layers, want in ((4, 512), (3, 16)):
        config = Qwen2Config(**COMMON, sliding_window=16, use_sliding_window=True).to_dict()
        config.pop("layer_types")
        config.update(architectures=["Qwen2ForCausalLM"], max_window_layers=max_window_layers)
        assert ModelConfig.from_hf_config(config, "qwen2").max_model_len == want


def test_malformed_layer_types_are_refused_naming_the_field():
    from transformers import Qwen2Config

    config = Qwen2Config(**COMMON).to_dict()
    config.update(architectures=["Qwen2ForCausalLM"], layer_types="sliding_attention")
    with pytest.raises(UnsupportedModelError, match="layer_types"):
        ModelConfig.from_hf_config(config, "qwen2")
