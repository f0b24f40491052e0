"""Dimensions of a Llama-family base model, shared by the control plane and the data plane.

The control plane validates uploaded adapters against these dimensions; the data plane derives them
from the checkpoint's `config.json`, read as transformers reads it for the file's architecture (the
defaults of that architecture's config class fill absent keys). Both compute the same fingerprint, so an
adapter registered for one base model is refused by a worker serving another.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace

from openlora.safe_json import JsonFieldError, JsonObject, describe

# PEFT target-module names this system serves, in layer order.
PROJECTIONS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Upper bound on any dimension or count read from a config (keeps every product of them in range).
MAX_DIM = 1 << 24


class UnsupportedModelError(ValueError):
    """The checkpoint is not of an architecture this system serves."""


@dataclass(frozen=True)
class Architecture:
    """One supported architecture as transformers reads its `config.json`: the model class, the
    `model_type` that selects it, and the defaults of its config class for keys a file leaves out (they
    differ between architectures; `hidden_act` silu, `rms_norm_eps` 1e-6, `rope_theta` 10000 and
    `tie_word_embeddings` false are the same in all four and sit with the code that reads them)."""

    class_name: str
    model_type: str
    config_class: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None  # None: one per attention head
    max_position_embeddings: int
    sliding_window: int | None  # Mistral; Qwen2 only with use_sliding_window
    max_window_layers: int | None  # Qwen2, Qwen3: layers from this index on slide
    nullable_keys: frozenset[str]  # keys the engine reads that the config class accepts as null
    head_dim: int | None = None  # None: hidden_size / num_attention_heads (Qwen3's class has its own, 128)


# The defaults of LlamaConfig, MistralConfig, Qwen2Config and Qwen3Config in transformers 5.
_QWEN2 = Architecture(
    class_name="Qwen2ForCausalLM",
    model_type="qwen2",
    config_class="Qwen2Config",
    vocab_size=151936,
    hidden_size=4096,
    intermediate_size=22016,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=32768,
    sliding_window=4096,
    max_window_layers=28,
    nullable_keys=frozenset({"num_key_value_heads", "sliding_window", "layer_types"}),
)

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        class_name="LlamaForCausalLM",
        model_type="llama",
        config_class="LlamaConfig",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=None,
        max_position_embeddings=2048,
        sliding_window=None,
        max_window_layers=None,
        nullable_keys=frozenset({"num_key_value_heads", "head_dim"}),
    ),
    Architecture(
        class_name="MistralForCausalLM",
        model_type="mistral",
        config_class="MistralConfig",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=4096 * 32,
        sliding_window=4096,
        max_window_layers=None,
        nullable_keys=frozenset({"head_dim", "sliding_window"}),
    ),
    _QWEN2,
    # Qwen3Config: Qwen2Config's defaults, and a head_dim of its own (its model adds per-head q/k norms).
    replace(
        _QWEN2, class_name="Qwen3ForCausalLM", model_type="qwen3", config_class="Qwen3Config", head_dim=128
    ),
)
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(a.class_name for a in ARCHITECTURES)
_BY_CLASS = {a.class_name: a for a in ARCHITECTURES}
_BY_MODEL_TYPE = {a.model_type: a for a in ARCHITECTURES}


def architecture_named(class_name: str) -> Architecture:
    """The supported architecture whose model class is `class_name` (KeyError otherwise)."""
    return _BY_CLASS[class_name]


def read_architecture(c: JsonObject) -> Architecture:
    """The architecture transformers' AutoModelForCausalLM builds for this config: the one `model_type`
    names; `architectures` alone when there is no `model_type`. A file whose two keys disagree is refused,
    since loading it by class name and loading it by model_type give different models."""
    model_type = c.get_str("model_type", None, max_chars=128)
    architectures = c.get_list(
        "architectures", lambda v: isinstance(v, str), "a list of class names", default=None
    )
    class_name = architectures[0] if architectures else None
    if model_type is None:
        if class_name is None:
            raise JsonFieldError(c.field("architectures"), "is required when model_type is absent")
        if class_name not in _BY_CLASS:
            raise JsonFieldError(
                c.field("architectures"),
                f"unsupported architecture {describe(class_name)}: supported are "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}",
            )
        return _BY_CLASS[class_name]
    if model_type not in _BY_MODEL_TYPE:
        raise JsonFieldError(
            c.field("model_type"),
            f"unsupported model_type {describe(model_type)}: supported are {', '.join(_BY_MODEL_TYPE)}",
        )
    architecture = _BY_MODEL_TYPE[model_type]
    if class_name is not None and class_name != architecture.class_name:
        raise JsonFieldError(
            c.field("architectures"),
            f"{describe(class_name)} disagrees with model_type {describe(model_type)}, from which "
            f"transformers builds {architecture.class_name}",
        )
    return architecture


def refuse_nulls(c: JsonObject, architecture: Architecture, keys: tuple[str, ...]) -> None:
    """Refuses a null for any of `keys` unless `architecture`'s config class accepts one there (its
    strict fields refuse it). JsonObject reads a null as an absent key, which would give the default."""
    for key in keys:
        if key in c.data and c.data[key] is None and key not in architecture.nullable_keys:
            raise JsonFieldError(
                c.field(key),
                f"is null, which transformers' {architecture.config_class} refuses: leave the key out for "
                "its default",
            )


@dataclass(frozen=True)
class BaseModelSpec:
    name: str
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def from_hf_config(cls, config: dict, name: str) -> BaseModelSpec:
        """Reads a Hugging Face `config.json` dict as transformers reads it for its architecture (absent
        keys take that config class's defaults); raises UnsupportedModelError naming the architecture,
        or the field that is of the wrong type or range."""
        c = JsonObject(config, "config.json")
        try:
            arch = read_architecture(c)
            refuse_nulls(c, arch, _SPEC_KEYS)
            num_heads = c.get_int("num_attention_heads", arch.num_attention_heads, lo=1, hi=MAX_DIM)
            hidden = c.get_int("hidden_size", arch.hidden_size, lo=1, hi=MAX_DIM)
            num_kv_heads = _num_key_value_heads(c, arch, num_heads)
            head_dim = c.get_int("head_dim", arch.head_dim, lo=1, hi=MAX_DIM) or max(1, hidden // num_heads)
            _check_attention_shape(c, num_heads, num_kv_heads, head_dim)
            return cls(
                name=name,
                architecture=arch.class_name,
                hidden_size=hidden,
                intermediate_size=c.get_int("intermediate_size", arch.intermediate_size, lo=1, hi=MAX_DIM),
                num_layers=c.get_int("num_hidden_layers", arch.num_hidden_layers, lo=1, hi=MAX_DIM),
                num_attention_heads=num_heads,
                num_key_value_heads=num_kv_heads,
                head_dim=head_dim,
                vocab_size=c.get_int("vocab_size", arch.vocab_size, lo=1, hi=MAX_DIM),
            )
        except JsonFieldError as e:
            raise UnsupportedModelError(str(e)) from None

    @property
    def fingerprint(self) -> str:
        """sha256 (hex) of the dimensions that decide whether an adapter fits; the name is left out."""
        dims = asdict(self)
        dims.pop("name")
        return hashlib.sha256(json.dumps(dims, sort_keys=True).encode()).hexdigest()

    def projection_shape(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of one projection, as PEFT's lora_A is (r, in) and lora_B (out, r)."""
        q_out = self.num_attention_heads * self.head_dim
        kv_out = self.num_key_value_heads * self.head_dim
        shapes = {
            "q_proj": (self.hidden_size, q_out),
            "k_proj": (self.hidden_size, kv_out),
            "v_proj": (self.hidden_size, kv_out),
            "o_proj": (q_out, self.hidden_size),
            "gate_proj": (self.hidden_size, self.intermediate_size),
            "up_proj": (self.hidden_size, self.intermediate_size),
            "down_proj": (self.intermediate_size, self.hidden_size),
        }
        if module not in shapes:
            raise ValueError(f"unknown projection {module!r}; expected one of {', '.join(PROJECTIONS)}")
        return shapes[module]


_SPEC_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)


def _check_attention_shape(c: JsonObject, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    """Shapes transformers cannot run either, refused before anything loads: grouped-query attention needs
    each key/value head to serve a whole number of query heads, and rotary embeddings rotate pairs of
    dimensions (an odd head_dim fails at the first forward)."""
    if num_heads % num_kv_heads:
        raise JsonFieldError(
            c.field("num_key_value_heads"),
            f"{num_kv_heads} does not divide num_attention_heads ({num_heads}): each key/value head must "
            "serve the same number of query heads",
        )
    if head_dim % 2:
        raise JsonFieldError(
            c.field("head_dim"),
            f"{head_dim} (given, or hidden_size / num_attention_heads) must be even: rotary embeddings "
            "rotate pairs of dimensions",
        )


def _num_key_value_heads(c: JsonObject, arch: Architecture, num_heads: int) -> int:
    """`num_key_value_heads`; absent, the config class's default (Mistral 8, Qwen2 and Qwen3 32, Llama one per
    attention head); null, one per attention head."""
    if "num_key_value_heads" in c.data or arch.num_key_value_heads is None:
        return c.get_int("num_key_value_heads", num_heads, lo=1, hi=num_heads)
    if arch.num_key_value_heads > num_heads:
        raise JsonFieldError(
            c.field("num_key_value_heads"),
            f"is absent, and the default of transformers' {arch.config_class}, {arch.num_key_value_heads}, "
            f"is more than num_attention_heads ({num_heads})",
        )
    return arch.num_key_value_heads
