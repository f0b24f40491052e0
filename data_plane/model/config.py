"""ModelConfig: what the engine needs from a Hugging Face `config.json` of the Llama family, read as
transformers reads it for the file's architecture (its defaults, and the settings its code honours)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from data_plane.model.rope_config import RopeScaling, read_rope
from openlora.base_model import (
    MAX_DIM,
    Architecture,
    BaseModelSpec,
    UnsupportedModelError,
    architecture_named,
    refuse_nulls,
)
from openlora.safe_json import JsonFieldError, JsonObject, describe, is_int, load_json_object

MAX_CONFIG_BYTES = 1 << 20
SILU_NAMES = ("silu", "swish")


@dataclass(frozen=True)
class ModelConfig:
    spec: BaseModelSpec
    rope_theta: float
    rope_scaling: RopeScaling
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2, or Llama and Qwen3 with attention_bias
    o_bias: bool  # Llama and Qwen3 with attention_bias
    mlp_bias: bool  # Llama with mlp_bias
    max_position_embeddings: int
    # Per decoder layer: the window its attention slides over (Mistral, Qwen2, Qwen3), None for a full layer.
    layer_windows: tuple[int | None, ...]
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    checkpoint_dtype: str  # "float32" | "bfloat16" | "float16"
    qk_norm: bool = False  # Qwen3: an RMSNorm over each head of the queries and keys before the rotation

    @classmethod
    def from_dir(cls, model_dir: Path) -> ModelConfig:
        """Reads `config.json` (and `generation_config.json` for EOS ids when present); raises
        UnsupportedModelError naming the file and field for anything malformed."""
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise UnsupportedModelError(f"{model_dir}: no config.json")
        generation_path = Path(model_dir) / "generation_config.json"
        try:
            # A number out of range (transformers writes int(1e30) for an unbounded length) fails only the
            # field that is read, not the file.
            config = load_json_object(
                path.read_bytes(), "config.json", max_bytes=MAX_CONFIG_BYTES, mark_out_of_range=True
            )
            generation = (
                load_json_object(
                    generation_path.read_bytes(),
                    "generation_config.json",
                    max_bytes=MAX_CONFIG_BYTES,
                    mark_out_of_range=True,
                ).data
                if generation_path.is_file()
                else None
            )
        except JsonFieldError as e:
            raise UnsupportedModelError(str(e)) from None
        return cls.from_hf_config(config.data, name=Path(model_dir).name, generation_config=generation)

    @classmethod
    def from_hf_config(cls, config: dict, name: str, generation_config: dict | None = None) -> ModelConfig:
        """`generation_config`: the checkpoint's generation_config.json, None when it has none."""
        spec = BaseModelSpec.from_hf_config(config, name)
        try:
            return cls._from_fields(
                spec,
                JsonObject(config, "config.json"),
                None
                if generation_config is None
                else JsonObject(generation_config, "generation_config.json"),
            )
        except JsonFieldError as e:
            raise UnsupportedModelError(str(e)) from None

    @classmethod
    def _from_fields(cls, spec: BaseModelSpec, c: JsonObject, generation: JsonObject | None) -> ModelConfig:
        arch = architecture_named(spec.architecture)
        # hidden_act, rms_norm_eps and tie_word_embeddings default alike in the three config classes
        refuse_nulls(
            c, arch, ("hidden_act", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings")
        )
        hidden_act = c.get_str("hidden_act", "silu", max_chars=64)
        if hidden_act not in SILU_NAMES:  # transformers' ACT2FN maps both names to SiLU
            raise JsonFieldError(
                c.field("hidden_act"), f"{describe(hidden_act)} is unsupported: only silu (or swish)"
            )
        max_positions = c.get_int("max_position_embeddings", arch.max_position_embeddings, lo=1, hi=MAX_DIM)
        rope_theta, rope_scaling = read_rope(c, max_positions, spec.head_dim)
        qkv_bias, o_bias, mlp_bias = _biases(c, arch)
        # Where transformers' generate() stops: at the generation config's EOS ids when the checkpoint has
        # one (none there: it never stops early), else at config.json's.
        eos = _token_ids(c if generation is None else generation, "eos_token_id")
        dtype = c.get_str("dtype", None, max_chars=32) or c.get_str("torch_dtype", None, max_chars=32)
        return cls(
            spec=spec,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            rms_norm_eps=c.get_number("rms_norm_eps", 1e-6, positive=True),
            tie_word_embeddings=c.get_bool("tie_word_embeddings", False),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            max_position_embeddings=max_positions,
            layer_windows=_layer_windows(c, arch, spec.num_layers),
            eos_token_ids=eos,
            bos_token_id=c.get_int("bos_token_id", None, lo=0, hi=MAX_DIM),
            checkpoint_dtype=dtype or "float32",
            qk_norm=arch.model_type == "qwen3",
        )

    @property
    def max_model_len(self) -> int:
        """Longest sequence served: the trained length. A sliding layer attends through its window at any
        length (as in transformers), so the window does not bound it."""
        return self.max_position_embeddings


def _biases(c: JsonObject, arch: Architecture) -> tuple[bool, bool, bool]:
    """(q/k/v, o, MLP) biases as transformers' modeling code of each architecture builds its linears:
    Llama from `attention_bias` and `mlp_bias`; Qwen3 from `attention_bias` (its MLP has none); Qwen2 q/k/v
    always and nothing else; Mistral none. A flag the code does not read is ignored, as transformers
    ignores it (a bias tensor stored for it is then an unexpected tensor, which the loader refuses)."""
    if arch.model_type == "qwen2":
        return True, False, False
    if arch.model_type == "qwen3":
        refuse_nulls(c, arch, ("attention_bias",))
        attention_bias = c.get_bool("attention_bias", False)
        return attention_bias, attention_bias, False
    if arch.model_type != "llama":
        return False, False, False
    refuse_nulls(c, arch, ("attention_bias", "mlp_bias"))
    attention_bias = c.get_bool("attention_bias", False)
    return attention_bias, attention_bias, c.get_bool("mlp_bias", False)


def _layer_windows(c: JsonObject, arch: Architecture, num_layers: int) -> tuple[int | None, ...]:
    """Each layer's window, None for a layer that attends in full, as transformers decides: Llama never
    slides (its code ignores `sliding_window`); Mistral slides every layer when a window is set; Qwen2 and
    Qwen3 only with `use_sliding_window`, on the layers `layer_types` names "sliding_attention", else (no
    `layer_types` in the file) on those from `max_window_layers` on. An absent `sliding_window` is the
    config class's default (4096 for both); a null one means none."""
    if arch.model_type == "llama":
        return (None,) * num_layers
    if arch.model_type == "mistral":
        return (_window(c, arch),) * num_layers
    refuse_nulls(c, arch, ("use_sliding_window", "max_window_layers"))
    # Qwen2Config and Qwen3Config drop the window unless use_sliding_window is set
    window = _window(c, arch) if c.get_bool("use_sliding_window", False) else None
    if c.data.get("layer_types") is None:
        first_sliding = c.get_int("max_window_layers", arch.max_window_layers, lo=0, hi=MAX_DIM)
        return tuple(window if layer >= first_sliding else None for layer in range(num_layers))
    types = c.get_list("layer_types", lambda v: isinstance(v, str), "a list of layer type names")
    if len(types) != num_layers:
        raise JsonFieldError(
            c.field("layer_types"),
            f"names {len(types)} layers, the model has {num_layers}: transformers refuses this config",
        )
    # "attention" is the legacy name transformers reads as "full_attention"; Qwen2 and Qwen3 build no other
    # mask.
    kinds = {"full_attention": False, "attention": False, "sliding_attention": True}
    unknown = next((t for t in types if t not in kinds), None)
    if unknown is not None:
        raise JsonFieldError(
            c.field("layer_types"),
            f"names {describe(unknown)}: transformers' {arch.class_name} has only full_attention and "
            "sliding_attention layers",
        )
    if window is None and "sliding_attention" in types:
        raise JsonFieldError(
            c.field("layer_types"),
            "names sliding_attention layers, but with use_sliding_window false or sliding_window null there "
            "is no window: transformers fails on this config",
        )
    return tuple(window if kinds[t] else None for t in types)


def _window(c: JsonObject, arch: Architecture) -> int | None:
    if "sliding_window" not in c.data:
        return arch.sliding_window
    return c.get_int("sliding_window", None, lo=1, hi=MAX_DIM)  # null: no window


def _token_ids(c: JsonObject, key: str) -> tuple[int, ...]:
    """An id or a list of ids (HF writes either)."""
    value = c.data.get(key)
    if isinstance(value, list):
        ids = c.get_list(key, is_int, "an integer or a list of integers")
        return tuple(ids)
    return () if value is None else (c.get_int(key, lo=0),)
