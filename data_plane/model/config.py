"""ModelConfig: what the engine needs from a Hugging Face `config.json` of the Llama family."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from openlora.base_model import BaseModelSpec, UnsupportedModelError

_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    rope_type: str  # "default" | "linear" | "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    spec: BaseModelSpec
    rope_theta: float
    rope_scaling: RopeScaling
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2, or Llama with attention_bias
    o_bias: bool  # Llama with attention_bias
    mlp_bias: bool
    max_position_embeddings: int
    sliding_window: int | None  # Mistral; None when attention is full
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    checkpoint_dtype: str  # "float32" | "bfloat16" | "float16"

    @classmethod
    def from_dir(cls, model_dir: Path) -> ModelConfig:
        """Reads `config.json` (and `generation_config.json` for EOS ids when present)."""
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise UnsupportedModelError(f"{model_dir}: no config.json")
        config = json.loads(path.read_text())
        generation_path = Path(model_dir) / "generation_config.json"
        generation = json.loads(generation_path.read_text()) if generation_path.is_file() else {}
        return cls.from_hf_config(config, name=Path(model_dir).name, generation_config=generation)

    @classmethod
    def from_hf_config(cls, config: dict, name: str, generation_config: dict | None = None) -> ModelConfig:
        spec = BaseModelSpec.from_hf_config(config, name)
        if config.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"unsupported hidden_act {config['hidden_act']!r}: only silu")
        is_qwen2 = spec.architecture == "Qwen2ForCausalLM"
        attention_bias = bool(config.get("attention_bias", False))
        eos = _token_ids((generation_config or {}).get("eos_token_id")) or _token_ids(
            config.get("eos_token_id")
        )
        sliding_window = config.get("sliding_window")
        if is_qwen2 and not config.get("use_sliding_window", False):
            sliding_window = None
        return cls(
            spec=spec,
            rope_theta=_rope_theta(config),
            rope_scaling=_rope_scaling(config),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=is_qwen2 or attention_bias,
            o_bias=attention_bias and not is_qwen2,
            mlp_bias=bool(config.get("mlp_bias", False)),
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            sliding_window=int(sliding_window) if sliding_window else None,
            eos_token_ids=eos,
            bos_token_id=config.get("bos_token_id"),
            checkpoint_dtype=str(config.get("dtype") or config.get("torch_dtype") or "float32"),
        )

    @property
    def max_model_len(self) -> int:
        """Longest sequence served: the trained length, bounded by a sliding window when there is one."""
        if self.sliding_window is not None:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings


def _token_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _rope_params(config: dict) -> dict:
    # transformers >= 5 writes `rope_parameters` (theta inside); older files use rope_theta + rope_scaling.
    return dict(config.get("rope_parameters") or config.get("rope_scaling") or {})


def _rope_theta(config: dict) -> float:
    return float(_rope_params(config).get("rope_theta", config.get("rope_theta", 10000.0)))


def _rope_scaling(config: dict) -> RopeScaling:
    params = _rope_params(config)
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in _ROPE_TYPES:
        raise UnsupportedModelError(f"unsupported rope scaling {rope_type!r}: supported are {_ROPE_TYPES}")
    if rope_type == "default":
        return RopeScaling("default")
    if rope_type == "linear":
        return RopeScaling("linear", factor=float(params["factor"]))
    return RopeScaling(
        "llama3",
        factor=float(params["factor"]),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )
