"""The rotary embedding a `config.json` asks for, read with the precedence transformers gives its keys."""

from __future__ import annotations

import math
from dataclasses import dataclass

from openlora.base_model import MAX_DIM
from openlora.safe_json import JsonFieldError, JsonObject, describe

ROPE_TYPES = ("default", "linear", "llama3", "dynamic", "yarn")
DEFAULT_THETA = 10000.0  # transformers' default base, the same for Llama, Mistral, Qwen2 and Qwen3


@dataclass(frozen=True)
class RopeScaling:
    rope_type: str  # "default" | "linear" | "llama3" | "yarn"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only, as is the next one
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None  # llama3 and yarn
    beta_fast: float = 32.0  # yarn only, as are the next three
    beta_slow: float = 1.0
    truncate: bool = True
    # cos and sin are multiplied by it (yarn's attention factor; 1 for every other type)
    attention_factor: float = 1.0


def read_rope(c: JsonObject, max_position_embeddings: int, head_dim: int) -> tuple[float, RopeScaling]:
    """(theta, scaling) as transformers resolves them when it builds the rotary embedding:

        params = rope_scaling if rope_scaling else rope_parameters   # a legacy dict replaces the new one whole
        theta  = params.rope_theta ?? top-level rope_theta ?? 10000
        type   = params.rope_type ?? params.type ?? "default"
        llama3 original length = top-level original_max_position_embeddings
                                 ?? params.original_max_position_embeddings ?? max_position_embeddings

    Required keys (linear, dynamic and yarn: factor; llama3: factor, low_freq_factor, high_freq_factor)
    have no default, as in transformers. A key set to null stays None in transformers, which then fails; it is refused
    here, as is any RoPE the engine does not implement, naming the key. YaRN's code alone reads a null: see
    `_yarn`."""
    params = _chosen_params(c)
    if _present(params, "rope_theta"):
        theta = params.get_number("rope_theta", positive=True)
    elif _present(c, "rope_theta"):
        theta = c.get_number("rope_theta", positive=True)
    else:
        theta = DEFAULT_THETA
    type_key = "rope_type" if "rope_type" in params.data else "type"
    rope_type = params.get_str(type_key, max_chars=32) if _present(params, type_key) else "default"
    if rope_type not in ROPE_TYPES:
        raise JsonFieldError(
            params.field(type_key),
            f"unsupported rope scaling {describe(rope_type)}: supported are {ROPE_TYPES}",
        )
    if rope_type == "default":  # transformers' default RoPE ignores partial_rotary_factor
        return theta, RopeScaling("default")
    _check_whole_head(c, params, head_dim)
    # transformers' YaRN derives a null factor (read in `_yarn`); an absent one is refused, as it refuses it
    yarn_null_factor = rope_type == "yarn" and "factor" in params.data and params.data["factor"] is None
    factor = None if yarn_null_factor else params.get_number("factor", positive=True)
    if rope_type == "dynamic":
        # transformers' dynamic NTK RoPE starts as the default one (its base is scaled by
        # (factor * L / max_position_embeddings - (factor - 1)), 1 at L = max_position_embeddings) and
        # recomputes its frequencies only once a sequence grows past max_position_embeddings, which the
        # engine never serves (max_model_len <= max_position_embeddings): up to there it is the default.
        return theta, RopeScaling("default")
    if rope_type == "linear":
        return theta, RopeScaling("linear", factor=factor)
    key = "original_max_position_embeddings"
    if _present(c, key):  # the Phi-3 convention: a top-level length wins over the one inside
        original = c.get_int(key, lo=1, hi=MAX_DIM)
    elif _present(params, key):
        original = params.get_int(key, lo=1, hi=MAX_DIM)
    else:
        original = max_position_embeddings
    if rope_type == "yarn":
        return theta, _yarn(params, factor, original, max_position_embeddings)
    return theta, RopeScaling(
        "llama3",
        factor=factor,
        low_freq_factor=params.get_number("low_freq_factor", positive=True),
        high_freq_factor=params.get_number("high_freq_factor", positive=True),
        original_max_position_embeddings=original,
    )


def _yarn(
    params: JsonObject, factor: float | None, original: int, max_position_embeddings: int
) -> RopeScaling:
    """YaRN as transformers computes it: `factor` (when null, max_position_embeddings / the original
    length), `beta_fast` and `beta_slow` (32 and 1 when absent, null or 0), `truncate` (true when absent;
    null skips the rounding as false does), and the attention factor applied to cos and sin:
    `attention_factor` when set, else mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are
    set and non-zero, else mscale(factor), where mscale(s, m) = 0.1 * m * ln(s) + 1 for s > 1 and 1
    otherwise. transformers reads these keys with `.get` and tests them for truth, so a null reads as
    absent (or as false) rather than failing as it does for the keys of the other RoPE types."""
    if factor is None:
        factor = max_position_embeddings / original

    def optional_number(key: str) -> float | None:
        return params.get_number(key) if params.data.get(key) is not None else None

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    # transformers tests `truncate` for truth: a null skips the rounding, as false does
    truncate = params.data.get("truncate", True) is not None and params.get_bool("truncate", True)
    attention_factor = optional_number("attention_factor")
    if attention_factor is None:
        m, m_all = optional_number("mscale"), optional_number("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    return RopeScaling(
        "yarn",
        factor=factor,
        original_max_position_embeddings=original,
        beta_fast=optional_number("beta_fast") or 32.0,
        beta_slow=optional_number("beta_slow") or 1.0,
        truncate=truncate,
        attention_factor=float(attention_factor),
    )


def _chosen_params(c: JsonObject) -> JsonObject:
    # transformers takes `rope_scaling or rope_parameters`: a non-empty legacy dict wins, even beside
    # the `rope_parameters` that transformers 5 writes.
    params = c.get_object("rope_scaling" if c.data.get("rope_scaling") else "rope_parameters")
    nested = [key for key, value in params.data.items() if isinstance(value, dict)]
    if nested:
        raise JsonFieldError(
            params.field(nested[0]),
            "RoPE parameters per layer type are unsupported (transformers' Llama, Mistral, Qwen2 and Qwen3 code "
            "reads one set)",
        )
    return params


def _present(c: JsonObject, key: str) -> bool:
    """Whether `key` is set. transformers keeps a null as None and then fails to build the RoPE, so a
    null is refused rather than read as absent."""
    if key in c.data and c.data[key] is None:
        raise JsonFieldError(c.field(key), "is null, which transformers cannot build a RoPE from")
    return key in c.data


def _check_whole_head(c: JsonObject, params: JsonObject, head_dim: int) -> None:
    """Scaled RoPE over a fraction of each head (`partial_rotary_factor`, inside the dict or at top
    level) is not implemented; transformers' Llama, Mistral, Qwen2 and Qwen3 code fails on it as well."""
    # a null inside the dict reaches the RoPE code; a null at top level is skipped, as transformers does
    source = params if _present(params, "partial_rotary_factor") else c
    if source.data.get("partial_rotary_factor") is None:
        return
    fraction = source.get_number("partial_rotary_factor", positive=True)
    if int(head_dim * fraction) != head_dim:
        raise JsonFieldError(
            source.field("partial_rotary_factor"),
            f"{describe(fraction)} rotates part of each head, which is unsupported with scaled RoPE",
        )
