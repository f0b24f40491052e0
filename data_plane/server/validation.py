"""Field-level checks of a GenerateRequest before the engine sees it.

`check_request` needs nothing but the request and the limits; `check_prompt_length` runs after
tokenizing. Both raise `RequestFieldError(field, reason)`, which the servicer maps to INVALID_ARGUMENT
with a message naming the field: `sampling.top_p must be in (0, 1], got 1.5`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from openlora.safe_json import describe
from openlora.v1 import inference_pb2

MAX_REQUEST_ID_CHARS = 128
MAX_PROMPT_CHARS = 1 << 20
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_MIX_ADAPTERS = 8
_MIX_METHODS = {inference_pb2.MIX_METHOD_UNSPECIFIED: "linear", inference_pb2.MIX_METHOD_LINEAR: "linear"}


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
    # (adapter name, weight): empty = base model; one = that adapter (weight 1); more = a linear mix.
    adapters: tuple[tuple[str, float], ...]
    mix_method: str

    @property
    def adapter_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.adapters)


def requested_adapter_names(request: inference_pb2.GenerateRequest) -> tuple[str, ...]:
    """The distinct non-empty adapter names a request mentions, in order (used to authorise it)."""
    names = [request.adapter] if request.adapter else []
    names += [m.adapter for m in request.mix if m.adapter]
    return tuple(dict.fromkeys(names))


def check_request(request: inference_pb2.GenerateRequest, limits: RequestLimits) -> ValidRequest:
    """Checks every field that needs no tokenizer; raises RequestFieldError naming the first bad one."""
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        raise RequestFieldError("request_id", f"must be at most {MAX_REQUEST_ID_CHARS} characters")

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
    if not temperature >= 0 or math.isinf(temperature):
        raise RequestFieldError("sampling.temperature", f"must be a finite number >= 0, got {temperature}")
    top_p = s.top_p if s.HasField("top_p") else 1.0
    if not 0 < top_p <= 1:
        raise RequestFieldError("sampling.top_p", f"must be in (0, 1], got {top_p}")
    if s.top_k < 0:
        raise RequestFieldError("sampling.top_k", f"must be >= 0, got {s.top_k}")
    max_tokens = s.max_tokens if s.HasField("max_tokens") else limits.default_max_tokens
    if not 1 <= max_tokens <= limits.max_tokens_limit:
        raise RequestFieldError(
            "sampling.max_tokens", f"must be in [1, {limits.max_tokens_limit}], got {max_tokens}"
        )
    penalty = s.repetition_penalty if s.HasField("repetition_penalty") else 1.0
    if not penalty > 0 or math.isinf(penalty):
        raise RequestFieldError("sampling.repetition_penalty", f"must be a finite number > 0, got {penalty}")
    if len(s.stop) > MAX_STOP_STRINGS:
        raise RequestFieldError("sampling.stop", f"must hold at most {MAX_STOP_STRINGS} strings")
    for i, stop in enumerate(s.stop):
        if not 0 < len(stop) <= MAX_STOP_CHARS:
            raise RequestFieldError(f"sampling.stop[{i}]", f"must be 1..{MAX_STOP_CHARS} characters")

    if request.mix_method not in _MIX_METHODS:
        raise RequestFieldError("mix_method", f"is unknown ({request.mix_method}); supported: linear")
    adapters: tuple[tuple[str, float], ...] = ()
    if request.mix:
        if request.adapter:
            raise RequestFieldError("mix", "and adapter are mutually exclusive")
        if len(request.mix) > MAX_MIX_ADAPTERS:
            raise RequestFieldError("mix", f"must hold at most {MAX_MIX_ADAPTERS} adapters")
        seen: set[str] = set()
        for i, member in enumerate(request.mix):
            if not member.adapter:
                raise RequestFieldError(f"mix[{i}].adapter", "must not be empty")
            if member.adapter in seen:
                raise RequestFieldError(f"mix[{i}].adapter", f"{describe(member.adapter)} appears twice")
            seen.add(member.adapter)
            if not math.isfinite(member.weight):
                raise RequestFieldError(f"mix[{i}].weight", f"must be finite, got {member.weight}")
        adapters = tuple((m.adapter, float(m.weight)) for m in request.mix)
    elif request.adapter:
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
        mix_method=_MIX_METHODS[request.mix_method],
    )


def check_prompt_length(num_prompt_tokens: int, limits: RequestLimits) -> None:
    """A prompt leaves room for at least one generated token."""
    if num_prompt_tokens == 0:
        raise RequestFieldError("prompt", "must not be empty (it tokenizes to no tokens)")
    if num_prompt_tokens > limits.max_model_len - 1:
        raise RequestFieldError(
            "prompt",
            f"is too long: {num_prompt_tokens} tokens, the limit is {limits.max_model_len - 1}",
        )
