"""ModelConfig: what the engine needs from a Hugging Face `config.json` of the Llama family."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from openlora.base_model import MAX_DIM, BaseModelSpec, UnsupportedModelError
from openlora.safe_json import JsonFieldError, JsonObject, describe, is_int, load_json_object

_ROPE_TYPES = ("default", "linear", "llama3")
MAX_CONFIG_BYTES = 1 << 20


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
        """Reads `config.json` (and `generation_config.json` for EOS ids when present); raises
        UnsupportedModelError naming the file and field for anything malformed."""
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise UnsupportedModelError(f"{model_dir}: no config.json")
        generation_path = Path(model_dir) / "generation_config.json"
        try:
            config = load_json_object(path.read_bytes(), "config.json", max_bytes=MAX_CONFIG_BYTES)
            generation = (
                load_json_object(
                    generation_path.read_bytes(), "generation_config.json", max_bytes=MAX_CONFIG_BYTES
                ).data
                if generation_path.is_file()
                else {}
            )
        except JsonFieldError as e:
            raise UnsupportedModelError(str(e)) from None
        return cls.from_hf_config(config.data, name=Path(model_dir).name, generation_config=generation)

    @classmethod
    def from_hf_config(cls, config: dict, name: str, generation_config: dict | None = None) -> ModelConfig:
        spec = BaseModelSpec.from_hf_config(config, name)
        try:
            return cls._from_fields(
                spec,
                JsonObject(config, "config.json"),
                JsonObject(generation_config or {}, "generation_config.json"),
            )
        except JsonFieldError as e:
            raise UnsupportedModelError(str(e)) from None

    @classmethod
    def _from_fields(cls, spec: BaseModelSpec, c: JsonObject, generation: JsonObject) -> ModelConfig:
        hidden_act = c.get_str("hidden_act", "silu", max_chars=64)
        if hidden_act != "silu":
            raise JsonFieldError(c.field("hidden_act"), f"{describe(hidden_act)} is unsupported: only silu")
        is_qwen2 = spec.architecture == "Qwen2ForCausalLM"
        attention_bias = c.get_bool("attention_bias", False)
        eos = _token_ids(generation, "eos_token_id") or _token_ids(c, "eos_token_id")
        sliding_window = c.get_int("sliding_window", None, lo=0, hi=MAX_DIM)
        if is_qwen2 and not _qwen2_slides(c, spec.num_layers):
            sliding_window = None
        dtype = c.get_str("dtype", None, max_chars=32) or c.get_str("torch_dtype", None, max_chars=32)
        return cls(
            spec=spec,
            rope_theta=_rope_theta(c),
            rope_scaling=_rope_scaling(c),
            rms_norm_eps=c.get_number("rms_norm_eps", 1e-6, positive=True),
            tie_word_embeddings=c.get_bool("tie_word_embeddings", False),
            qkv_bias=is_qwen2 or attention_bias,
            o_bias=attention_bias and not is_qwen2,
            mlp_bias=c.get_bool("mlp_bias", False),
            max_position_embeddings=c.get_int("max_position_embeddings", 2048, lo=1, hi=MAX_DIM),
            sliding_window=sliding_window or None,
            eos_token_ids=eos,
            bos_token_id=c.get_int("bos_token_id", None, lo=0, hi=MAX_DIM),
            checkpoint_dtype=dtype or "float32",
        )

    @property
    def max_model_len(self) -> int:
        """Longest sequence served: the trained length, bounded by a sliding window when there is one."""
        if self.sliding_window is not None:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings


def _qwen2_slides(c: JsonObject, num_layers: int) -> bool:
    """Whether any Qwen2 layer attends through a sliding window, as transformers decides: the config's
    `layer_types` when it lists them, else `use_sliding_window` for the layers from `max_window_layers` on
    (none when that is the layer count or more)."""
    layer_types = c.data.get("layer_types")
    if layer_types is not None:
        types = c.get_list("layer_types", lambda v: isinstance(v, str), "a list of layer type names")
        return "sliding_attention" in types
    if not c.get_bool("use_sliding_window", False):
        return False
    return c.get_int("max_window_layers", num_layers, lo=0, hi=MAX_DIM) < num_layers


def _token_ids(c: JsonObject, key: str) -> tuple[int, ...]:
    """An id or a list of ids (HF writes either)."""
    value = c.data.get(key)
    if isinstance(value, list):
        ids = c.get_list(key, is_int, "an integer or a list of integers")
        return tuple(ids)
    return () if value is None else (c.get_int(key, lo=0),)


def _rope_params(c: JsonObject) -> JsonObject:
    # transformers >= 5 writes `rope_parameters` (theta inside); older files use rope_theta + rope_scaling.
    return c.get_object("rope_parameters") if c.data.get("rope_parameters") else c.get_object("rope_scaling")


def _rope_theta(c: JsonObject) -> float:
    params = _rope_params(c)
    if "rope_theta" in params:
        return params.get_number("rope_theta", positive=True)
    return c.get_number("rope_theta", 10000.0, positive=True)


def _rope_scaling(c: JsonObject) -> RopeScaling:
    params = _rope_params(c)
    rope_type = params.get_str("rope_type", None, max_chars=32) or params.get_str("type", None, max_chars=32)
    rope_type = rope_type or "default"
    if rope_type not in _ROPE_TYPES:
        raise JsonFieldError(
            params.field("rope_type"),
            f"unsupported rope scaling {describe(rope_type)}: supported are {_ROPE_TYPES}",
        )
    if rope_type == "default":
        return RopeScaling("default")
    if rope_type == "linear":
        return RopeScaling("linear", factor=params.get_number("factor", positive=True))
    return RopeScaling(
        "llama3",
        factor=params.get_number("factor", positive=True),
        low_freq_factor=params.get_number("low_freq_factor", 1.0, positive=True),
        high_freq_factor=params.get_number("high_freq_factor", 4.0, positive=True),
        original_max_position_embeddings=params.get_int(
            "original_max_position_embeddings", 8192, lo=1, hi=MAX_DIM
        ),
    )
