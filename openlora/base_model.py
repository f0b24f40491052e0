"""Dimensions of a Llama-family base model, shared by the control plane and the data plane.

The control plane validates uploaded adapters against these dimensions; the data plane derives them
from the checkpoint's `config.json`. Both compute the same fingerprint, so an adapter registered for
one base model is refused by a worker serving another.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from openlora.safe_json import JsonFieldError, JsonObject, describe

# PEFT target-module names this system serves, in layer order.
PROJECTIONS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# Upper bound on any dimension or count read from a config (keeps every product of them in range).
MAX_DIM = 1 << 24


class UnsupportedModelError(ValueError):
    """The checkpoint is not of an architecture this system serves."""


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
        """Reads a Hugging Face `config.json` dict; raises UnsupportedModelError naming the architecture,
        or the field that is missing or of the wrong type or range."""
        c = JsonObject(config, "config.json")
        try:
            architectures = c.get_list(
                "architectures", lambda v: isinstance(v, str), "a list of class names", default=None
            )
            architecture = (architectures or [c.get_str("model_type", "<missing>", max_chars=128)])[0]
            if architecture not in SUPPORTED_ARCHITECTURES:
                raise JsonFieldError(
                    c.field("architectures"),
                    f"unsupported architecture {describe(architecture)}: supported are "
                    f"{', '.join(SUPPORTED_ARCHITECTURES)}",
                )
            num_heads = c.get_int("num_attention_heads", lo=1, hi=MAX_DIM)
            hidden = c.get_int("hidden_size", lo=1, hi=MAX_DIM)
            return cls(
                name=name,
                architecture=architecture,
                hidden_size=hidden,
                intermediate_size=c.get_int("intermediate_size", lo=1, hi=MAX_DIM),
                num_layers=c.get_int("num_hidden_layers", lo=1, hi=MAX_DIM),
                num_attention_heads=num_heads,
                num_key_value_heads=c.get_int("num_key_value_heads", num_heads, lo=1, hi=num_heads),
                head_dim=c.get_int("head_dim", None, lo=1, hi=MAX_DIM) or max(1, hidden // num_heads),
                vocab_size=c.get_int("vocab_size", lo=1, hi=MAX_DIM),
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
