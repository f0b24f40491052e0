"""Field-level checks of a GenerateRequest before the engine sees it.

`check_request` needs nothing but the request and the limits; `check_prompt_length` runs after
tokenizing. Both raise `RequestFieldError(field, reason)`, which the servicer maps to INVALID_ARGUMENT
with a message naming the field: `sampling.top_p must be in (0, 1], got 1.5`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from openlora.mix_rules import density_problem, weight_problem
from openlora.names import ADAPTER_NAME_RULE, is_adapter_name
from openlora.safe_json import describe
from openlora.text_rules import (
    MAX_REQUEST_ID_CHARS,
    SERVING_KEY_SUFFIX,
    SERVING_KEY_SUFFIX_RULE,
    identifier_problem,
)
from openlora.v1 import inference_pb2

MAX_PROMPT_CHARS = 1 << 20
# A mix member that names the base model ("") outside an ensemble.
BASE_MEMBER_RULE = "must not be empty (only an ensemble may hold the base)"
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_MIX_ADAPTERS = 8
_MIX_METHODS = {
    inference_pb2.MIX_METHOD_UNSPECIFIED: "linear",
    inference_pb2.MIX_METHOD_LINEAR: "linear",
    inference_pb2.MIX_METHOD_TIES: "ties",
    inference_pb2.MIX_METHOD_DARE_LINEAR: "dare_linear",
    inference_pb2.MIX_METHOD_DARE_TIES: "dare_ties",
    inference_pb2.MIX_METHOD_MAGNITUDE_PRUNE: "magnitude_prune",
    inference_pb2.MIX_METHOD_ENSEMBLE: "ensemble",
}
# Methods computed on the real deltas and re-factorized by SVD into one slot (data_plane.fusion).
MERGE_METHODS = frozenset({"ties", "dare_linear", "dare_ties", "magnitude_prune"})
# Methods whose merge elects a sign per parameter (majority_sign_method applies).
SIGN_METHODS = frozenset({"ties", "dare_ties"})
_SIGN_METHODS = {
    inference_pb2.MAJORITY_SIGN_METHOD_UNSPECIFIED: "total",
    inference_pb2.MAJORITY_SIGN_METHOD_TOTAL: "total",
    inference_pb2.MAJORITY_SIGN_METHOD_FREQUENCY: "frequency",
}
_COMBINES = {
    inference_pb2.ENSEMBLE_COMBINE_UNSPECIFIED: "probs",
    inference_pb2.ENSEMBLE_COMBINE_PROBS: "probs",
    inference_pb2.ENSEMBLE_COMBINE_LOGPROBS: "logprobs",
}


class RequestFieldError(ValueError):
    """One field of the request is invalid."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field} {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class RequestLimits:
    max_tokens_limit: int
    default_max_tokens: int
    vocab_size: int
    # Longest sequence the engine holds; a prompt may use at most max_model_len - 1 tokens.
    max_model_len: int


@dataclass(frozen=True)
class ValidRequest:
    """A checked request, ready to be tokenized and turned into an engine request."""

    request_id: str  # may be empty: the servicer makes one
    prompt: str | None
    prompt_token_ids: tuple[int, ...] | None
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    seed: int | None
    stop: tuple[str, ...]
    repetition_penalty: float
    logprobs: bool
    # (adapter name, weight): empty = base model; one = that adapter (weight 1); more = a mix by
    # `mix_method`. An ensemble may hold the base model as a member, named "".
    adapters: tuple[tuple[str, float], ...]
    # "linear" | "ties" | "dare_linear" | "dare_ties" | "magnitude_prune" | "ensemble"
    mix_method: str
    # True when `adapters` came from the request's `mix` (even one member), False from `adapter`: only the
    # latter may name a saved mix.
    from_mix: bool = False
    # Fraction kept by the merge methods, in (0, 1]; 1.0 for the other methods.
    density: float = 1.0
    # "total" | "frequency": sign election of ties and dare_ties.
    majority_sign_method: str = "total"
    # "probs" | "logprobs": how an ensemble combines its members.
    combine: str = "probs"
    # Whether tokenizing `prompt` adds the tokenizer's special tokens (BOS): not for a rendered chat,
    # whose template already wrote them (as transformers' apply_chat_template and vLLM tokenize it).
    add_special_tokens: bool = True
    # The OpenAI API's field for a max_tokens the request set ("max_tokens", "max_completion_tokens"): a
    # prompt that leaves no room for it is refused naming it, as OpenAI and vLLM answer. Empty (gRPC, or no
    # max_tokens sent): the answer stops at the context with finish reason length, as the proto says.
    max_tokens_field: str = ""

    @property
    def is_merge(self) -> bool:
        """True when the mix is a merge built into one derived adapter (data_plane.fusion)."""
        return self.mix_method in MERGE_METHODS and bool(self.adapters)

    @property
    def is_ensemble(self) -> bool:
        return self.mix_method == "ensemble" and bool(self.adapters)

    @property
    def adapter_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.adapters)


def requested_adapter_names(request: inference_pb2.GenerateRequest) -> tuple[str, ...]:
    """The distinct non-empty adapter names a request mentions, in order (used to authorise it). A mix
    over the member limit is refused here, before any name goes to the control plane: hundreds of names
    per request would make every call an expensive Authorize for everyone."""
    if len(request.mix) > MAX_MIX_ADAPTERS:
        raise RequestFieldError(
            "mix", f"must hold at most {MAX_MIX_ADAPTERS} adapters, got {len(request.mix)}"
        )
    names = [request.adapter] if request.adapter else []
    names += [m.adapter for m in request.mix if m.adapter]
    # A name no adapter can have never goes to the control plane: check_request refuses it by its field
    # once the key is known good.
    return tuple(dict.fromkeys(name for name in names if is_adapter_name(name)))


def check_request(request: inference_pb2.GenerateRequest, limits: RequestLimits) -> ValidRequest:
    """Checks every field that needs no tokenizer; raises RequestFieldError naming the first bad one."""
    # The control plane's rule for the usage record's key: one it refuses after the tokens went out is
    # dead-lettered, not billed (a NUL id was served free while the control plane was unreachable).
    problem = identifier_problem(request.request_id, MAX_REQUEST_ID_CHARS)
    if problem is not None:
        raise RequestFieldError("request_id", problem)
    if SERVING_KEY_SUFFIX.search(request.request_id):
        raise RequestFieldError("request_id", SERVING_KEY_SUFFIX_RULE)

    has_text, has_ids = bool(request.prompt), bool(request.prompt_token_ids)
    if has_text and has_ids:
        raise RequestFieldError("prompt", "and prompt_token_ids are mutually exclusive; set exactly one")
    if not has_text and not has_ids:
        raise RequestFieldError("prompt", "must not be empty (set prompt or prompt_token_ids)")
    if has_text and len(request.prompt) > MAX_PROMPT_CHARS:
        raise RequestFieldError("prompt", f"must be at most {MAX_PROMPT_CHARS} characters")
    if has_ids:
        if len(request.prompt_token_ids) > limits.max_model_len - 1:
            raise RequestFieldError(
                "prompt_token_ids",
                f"is too long: {len(request.prompt_token_ids)} tokens, the limit is {limits.max_model_len - 1}",
            )
        for i, token_id in enumerate(request.prompt_token_ids):
            if not 0 <= token_id < limits.vocab_size:
                raise RequestFieldError(
                    f"prompt_token_ids[{i}]", f"must be in [0, {limits.vocab_size}), got {token_id}"
                )

    s = request.sampling
    temperature = s.temperature if s.HasField("temperature") else 0.0
    if (problem := temperature_problem(temperature)) is not None:
        raise RequestFieldError("sampling.temperature", problem)
    top_p = s.top_p if s.HasField("top_p") else 1.0
    if (problem := top_p_problem(top_p)) is not None:
        raise RequestFieldError("sampling.top_p", problem)
    if s.top_k < 0:
        raise RequestFieldError("sampling.top_k", f"must be >= 0, got {s.top_k}")
    max_tokens = s.max_tokens if s.HasField("max_tokens") else limits.default_max_tokens
    if not 1 <= max_tokens <= limits.max_tokens_limit:
        raise RequestFieldError(
            "sampling.max_tokens", f"must be in [1, {limits.max_tokens_limit}], got {max_tokens}"
        )
    penalty = s.repetition_penalty if s.HasField("repetition_penalty") else 1.0
    if (problem := penalty_problem(penalty)) is not None:
        raise RequestFieldError("sampling.repetition_penalty", problem)
    if len(s.stop) > MAX_STOP_STRINGS:
        raise RequestFieldError("sampling.stop", f"must hold at most {MAX_STOP_STRINGS} strings")
    for i, stop in enumerate(s.stop):
        if not 0 < len(stop) <= MAX_STOP_CHARS:
            raise RequestFieldError(f"sampling.stop[{i}]", f"must be 1..{MAX_STOP_CHARS} characters")

    method, density, sign_method, combine = _check_mix_options(request)
    adapters: tuple[tuple[str, float], ...] = ()
    if request.mix:
        adapters = _check_mix_members(request, method)
    elif request.adapter:
        if not is_adapter_name(request.adapter):
            raise RequestFieldError("adapter", ADAPTER_NAME_RULE)
        adapters = ((request.adapter, 1.0),)

    return ValidRequest(
        request_id=request.request_id,
        prompt=request.prompt if has_text else None,
        prompt_token_ids=tuple(request.prompt_token_ids) if has_ids else None,
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=int(s.top_k),
        max_tokens=int(max_tokens),
        seed=int(s.seed) if s.HasField("seed") else None,
        stop=tuple(s.stop),
        repetition_penalty=float(penalty),
        logprobs=request.logprobs,
        adapters=adapters,
        mix_method=method,
        from_mix=bool(request.mix),
        density=density,
        majority_sign_method=sign_method,
        combine=combine,
    )


def temperature_problem(temperature: float) -> str | None:
    """Why a sampling temperature is refused, or None."""
    if not temperature >= 0 or math.isinf(temperature):
        return f"must be a finite number >= 0, got {temperature}"
    return None


def top_p_problem(top_p: float) -> str | None:
    """Why a nucleus-sampling top_p is refused, or None."""
    if not 0 < top_p <= 1:
        return f"must be in (0, 1], got {top_p}"
    return None


def penalty_problem(penalty: float) -> str | None:
    """Why a repetition penalty is refused, or None."""
    if not penalty > 0 or math.isinf(penalty):
        return f"must be a finite number > 0, got {penalty}"
    return None


def _check_mix_options(request: inference_pb2.GenerateRequest) -> tuple[str, float, str, str]:
    """(method, density, sign method, combine) of a request; an option set for a method (or a request
    without a mix) it does not apply to is refused rather than silently ignored."""
    if request.mix_method not in _MIX_METHODS:
        supported = ", ".join(dict.fromkeys(_MIX_METHODS.values()))
        raise RequestFieldError("mix_method", f"is unknown ({request.mix_method}); supported: {supported}")
    method = _MIX_METHODS[request.mix_method]
    has_mix = bool(request.mix)
    if method != "linear" and not has_mix:  # linear is every client's default, sent with or without a mix
        raise RequestFieldError("mix_method", f"{method} applies only to a request with a mix")
    density = 1.0
    if request.HasField("density"):
        if not has_mix or method not in MERGE_METHODS:
            raise RequestFieldError("density", f"applies only to a mix by {', '.join(sorted(MERGE_METHODS))}")
        density = float(request.density)
        problem = density_problem(density)
        if problem is not None:
            raise RequestFieldError("density", problem)
    if request.majority_sign_method not in _SIGN_METHODS:
        raise RequestFieldError(
            "majority_sign_method",
            f"is unknown ({request.majority_sign_method}); supported: total, frequency",
        )
    if request.majority_sign_method and (not has_mix or method not in SIGN_METHODS):
        raise RequestFieldError(
            "majority_sign_method", f"applies only to a mix by {', '.join(sorted(SIGN_METHODS))}"
        )
    if request.combine not in _COMBINES:
        raise RequestFieldError("combine", f"is unknown ({request.combine}); supported: probs, logprobs")
    if request.combine and (not has_mix or method != "ensemble"):
        raise RequestFieldError("combine", "applies only to a mix by ensemble")
    return method, density, _SIGN_METHODS[request.majority_sign_method], _COMBINES[request.combine]


def _check_mix_members(request: inference_pb2.GenerateRequest, method: str) -> tuple[tuple[str, float], ...]:
    """The (name, weight) members of `request.mix`; only an ensemble may name the base model ("")."""
    if request.adapter:
        raise RequestFieldError("mix", "and adapter are mutually exclusive")
    if len(request.mix) > MAX_MIX_ADAPTERS:
        raise RequestFieldError(
            "mix", f"must hold at most {MAX_MIX_ADAPTERS} adapters, got {len(request.mix)}"
        )
    seen: set[str] = set()
    for i, member in enumerate(request.mix):
        if not member.adapter and method != "ensemble":
            raise RequestFieldError(f"mix[{i}].adapter", BASE_MEMBER_RULE)
        if member.adapter and not is_adapter_name(member.adapter):
            raise RequestFieldError(f"mix[{i}].adapter", ADAPTER_NAME_RULE)
        if member.adapter in seen:
            what = describe(member.adapter) if member.adapter else "the base model"
            raise RequestFieldError(f"mix[{i}].adapter", f"{what} appears twice")
        seen.add(member.adapter)
        problem = weight_problem(member.weight, method)
        if problem is not None:
            raise RequestFieldError(f"mix[{i}].weight", problem)
    if all(member.weight == 0 for member in request.mix):
        raise RequestFieldError("mix", "weights are all zero")
    return tuple((m.adapter, float(m.weight)) for m in request.mix)


def check_prompt_length(
    num_prompt_tokens: int, limits: RequestLimits, valid: ValidRequest | None = None
) -> None:
    """A prompt leaves room for at least one generated token, and for all of `valid.max_tokens` when
    `valid.max_tokens_field` asks so (the OpenAI API)."""
    if num_prompt_tokens == 0:
        raise RequestFieldError("prompt", "must not be empty (it tokenizes to no tokens)")
    if num_prompt_tokens > limits.max_model_len - 1:
        raise RequestFieldError(
            "prompt",
            f"is too long: {num_prompt_tokens} tokens, the limit is {limits.max_model_len - 1}",
        )
    if (
        valid is not None
        and valid.max_tokens_field
        and num_prompt_tokens + valid.max_tokens > limits.max_model_len
    ):
        room = limits.max_model_len - num_prompt_tokens
        raise RequestFieldError(
            valid.max_tokens_field,
            f"is {valid.max_tokens}, but this model's context holds {limits.max_model_len} tokens and the "
            f"prompt uses {num_prompt_tokens}: at most {room} can be generated",
        )
