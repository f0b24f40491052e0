"""Request bodies of the OpenAI-compatible API, parsed and checked field by field.

`parse_completion` and `parse_chat` read the JSON (bounded by `safe_json`) into a `Body`; a field
OpenLoRA does not support is refused by name (`BodyError`), never ignored. `to_generate_request` builds
the same GenerateRequest the gRPC API takes, so that one validation (`check_request`) and one
generate path serve both; `openai_field_error` renames its fields to the body's (`sampling.top_p` ->
`top_p`).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

from data_plane.server.validation import (
    BASE_MEMBER_RULE,
    MAX_MIX_ADAPTERS,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    RequestFieldError,
    penalty_problem,
    temperature_problem,
    top_p_problem,
)
from openlora.mix_rules import density_problem, weight_problem
from openlora.safe_json import (
    JsonFieldError,
    JsonObject,
    LoneSurrogate,
    OutOfRangeNumber,
    describe,
    load_json,
    whole_number,
)
from openlora.v1 import inference_pb2

MAX_BODY_BYTES = 4 << 20  # larger bodies are refused with 413 before they are read
MAX_MESSAGES = 1024
# Lists are measured before any per-element work: a 4 MiB body holds two million token ids, and checking
# each in Python held the event loop (and the engine) for seconds, before the key was even checked.
MAX_PROMPT_TOKEN_IDS = 1 << 17  # longer than any context served; the context limit is checked later
MAX_CONTENT_PARTS = 1024
# The most JSON values a body may hold, counted from its commas and brackets before it is parsed. Parsing
# visits every value in Python, about a second per million: a 4 MiB body of `{}` (2.8 million) took 3.5 s.
# Below the bound, a list too long for its field is refused naming the field, after a parse of at most
# about a second, on a parsing thread (`app._parse_limiter`), never on the event loop.
MAX_BODY_VALUES = 1 << 20
# OpenAI's `seed` is an int64; the GenerateRequest's is a uint64, which holds a negative seed as its two's
# complement (-1 is 2^64 - 1): every int64 is its own seed, none shares one with another.
MIN_SEED, MAX_SEED = -(1 << 63), (1 << 63) - 1
_INT32_MAX = (1 << 31) - 1
# The GenerateRequest's float fields are float32: a finite JSON number past float32's largest value would
# arrive as inf, and a nonzero one below its smallest as 0. Each is checked as the client sent it first.
_FLOAT32_MAX = 3.4028234663852886e38
# Where 0 is refused (top_p, repetition_penalty, density, a mix weight) a nonzero value in range that
# float32 cannot hold is raised to float32's smallest normal value, the nearest value the field keeps
# (not the smallest subnormal, 1.4e-45: GPU kernels flush subnormals to 0).
_FLOAT32_MIN_NORMAL = 2.0**-126
_ROLES = ("system", "developer", "user", "assistant")
# The other fields of an assistant message as OpenAI's client gives its own reply back (`message.model_dump()`
# holds each, null where the reply had none): taken when null, as a field absent, and refused otherwise.
_NULL_MESSAGE_FIELDS = frozenset({"refusal", "tool_calls", "function_call", "audio", "annotations"})

# Fields accepted only with a value that changes nothing (OpenAI's default); any other value is refused.
_NEUTRAL = {
    "n": 1,
    "best_of": 1,
    "echo": False,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logit_bias": {},
    "tools": [],
    "functions": [],
    "parallel_tool_calls": False,
    "store": False,
    "suffix": "",  # completions only
    "response_format": {"type": "text"},  # chat only, as the next two
    "tool_choice": "none",
}
_COMPLETION_ONLY = {"suffix"}
_CHAT_ONLY = {"response_format", "tool_choice"}
_COMMON = {
    "model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
    "user", "logprobs", "repetition_penalty", "mix", "mix_method", "density", "majority_sign_method", "combine",
    *(_NEUTRAL.keys() - _COMPLETION_ONLY - _CHAT_ONLY),
}  # fmt: skip
_COMPLETION_FIELDS = _COMMON | {"prompt"} | _COMPLETION_ONLY
_CHAT_FIELDS = (
    _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "chat_template_kwargs"} | _CHAT_ONLY
)
# chat_template_kwargs: extra variables of the chat template (vLLM's extension; Qwen3's `enable_thinking`).
# The names the template gets from the body's own fields, or that no template could read, are refused.
MAX_TEMPLATE_KWARGS = 16
_TEMPLATE_KWARG_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}", re.ASCII)
_TEMPLATE_OWN_NAMES = frozenset({"messages", "tools", "documents", "add_generation_prompt"})
# check_request's field names -> the body's.
_RENAMED = {"sampling.": "", "prompt_token_ids": "prompt", "request_id": "X-Request-Id", "adapter": "model"}


class BodyError(RequestFieldError):
    """A request body, or one field of it (`param`; None for the whole body), is refused: INVALID_ARGUMENT,
    HTTP 400."""

    def __init__(self, param: str | None, reason: str) -> None:
        super().__init__(param or "", reason)
        if not param:
            self.args = (reason,)
        self.param = param


@dataclass(frozen=True)
class Body:
    """A checked completion or chat completion body."""

    model: str
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with usage
    prompt: str | None  # completions: text prompt
    prompt_token_ids: tuple[int, ...] | None  # completions: token ids
    messages: tuple[dict[str, str], ...]  # chat: {"role", "content"} each, and "name" when sent
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int
    repetition_penalty: float | None
    seed: int | None  # in [MIN_SEED, MAX_SEED], as the body sent it
    stop: tuple[str, ...]
    logprobs: bool  # the chosen tokens' log-probabilities
    mix: tuple[tuple[str, float], ...]  # runtime fusion: (adapter name, weight)
    mix_method: str
    density: float | None = None  # TIES, DARE and magnitude pruning: the fraction of each delta kept
    majority_sign_method: str = ""  # TIES sign election: "total" or "frequency"
    combine: str = ""  # ENSEMBLE: "probs" or "logprobs"
    max_tokens_name: str = "max_tokens"  # chat: "max_completion_tokens" when the body named it so
    # chat: chat_template_kwargs, (name, JSON value) each, in the body's order
    template_kwargs: tuple[tuple[str, object], ...] = ()

    @property
    def adapter_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(name for name, _ in self.mix if name))


def _fields_named(parse):
    """Every field error of a parser as a BodyError naming the field (a JsonFieldError raised by a typed
    getter outside `_body` escaped as a 500 before)."""

    @functools.wraps(parse)
    def wrapper(data: bytes, *args) -> Body:
        try:
            return parse(data, *args)
        except JsonFieldError as error:
            raise BodyError(error.field, error.reason) from None

    return wrapper


@_fields_named
def parse_completion(data: bytes, max_tokens_limit: int = _INT32_MAX) -> Body:
    """POST /v1/completions; `max_tokens` may be 1 to `max_tokens_limit` (the worker's limit)."""
    obj = _load(data, _COMPLETION_FIELDS)
    prompt, prompt_ids = _prompt(obj)
    logprobs = obj.get_int("logprobs", None, lo=0)
    if logprobs:
        raise BodyError("logprobs", "must be 0: only the chosen tokens' log-probabilities are returned")
    max_tokens = obj.get_int("max_tokens", None, lo=1, hi=max_tokens_limit)
    return _body(
        obj,
        prompt=prompt,
        prompt_ids=prompt_ids,
        messages=(),
        logprobs=logprobs is not None,
        max_tokens=max_tokens,
    )


@_fields_named
def parse_chat(data: bytes, max_tokens_limit: int = _INT32_MAX) -> Body:
    """POST /v1/chat/completions; `max_completion_tokens` (or `max_tokens`) may be 1 to `max_tokens_limit`."""
    obj = _load(data, _CHAT_FIELDS)
    messages = _messages(obj)
    logprobs = obj.get_bool("logprobs", False)
    if obj.get_int("top_logprobs", 0, lo=0):
        raise BodyError("top_logprobs", "must be 0: only the chosen tokens' log-probabilities are returned")
    if "max_completion_tokens" in obj and "max_tokens" in obj:
        raise BodyError("max_completion_tokens", "and max_tokens are mutually exclusive")
    name = "max_completion_tokens" if "max_completion_tokens" in obj else "max_tokens"
    max_tokens = obj.get_int(name, None, lo=1, hi=max_tokens_limit)
    body = _body(
        obj, prompt=None, prompt_ids=None, messages=messages, logprobs=logprobs, max_tokens=max_tokens
    )
    return replace(body, max_tokens_name=name, template_kwargs=_template_kwargs(obj))


def _template_kwargs(obj: JsonObject) -> tuple[tuple[str, object], ...]:
    """`chat_template_kwargs`: variables handed to the chat template beside the messages, as vLLM hands
    them (`{"enable_thinking": false}` for Qwen3's template); a template that reads none ignores them."""
    kwargs = obj.get_object("chat_template_kwargs")
    if len(kwargs.data) > MAX_TEMPLATE_KWARGS:
        raise BodyError("chat_template_kwargs", f"must name at most {MAX_TEMPLATE_KWARGS} variables")
    for key in kwargs.data:
        if not _TEMPLATE_KWARG_NAME.fullmatch(key):
            raise BodyError(
                "chat_template_kwargs",
                f"{describe(key)} is not a template variable name ([A-Za-z_][A-Za-z0-9_]*)",
            )
        if key in _TEMPLATE_OWN_NAMES:
            raise BodyError(f"chat_template_kwargs.{key}", "is set by the request itself, not by a variable")
        if _holds_out_of_range(kwargs.data[key]):
            raise BodyError(f"chat_template_kwargs.{key}", "holds a number out of range (past float64's)")
    return tuple(kwargs.data.items())


def _holds_out_of_range(value: object) -> bool:
    """Whether a JSON value holds a number no float or 64-bit int holds (`1e400`) at any depth."""
    if isinstance(value, OutOfRangeNumber):
        return True
    if isinstance(value, dict):
        return any(_holds_out_of_range(v) for v in value.values())
    return isinstance(value, list) and any(_holds_out_of_range(v) for v in value)


def to_generate_request(
    body: Body, prompt: str | None, request_id: str, adapter: str
) -> inference_pb2.GenerateRequest:
    """The GenerateRequest of a body; `prompt` is the text (the rendered chat for chat), `adapter` the
    adapter `model` names ("" for the base model)."""
    request = inference_pb2.GenerateRequest(
        request_id=request_id,
        adapter=adapter,
        logprobs=body.logprobs,
        mix_method=_enum(inference_pb2.MixMethod, "MIX_METHOD_", "mix_method", body.mix_method),
        majority_sign_method=_enum(
            inference_pb2.MajoritySignMethod,
            "MAJORITY_SIGN_METHOD_",
            "majority_sign_method",
            body.majority_sign_method,
        ),
        combine=_enum(inference_pb2.EnsembleCombine, "ENSEMBLE_COMBINE_", "combine", body.combine),
    )
    if body.density is not None:
        request.density = body.density
    if body.prompt_token_ids is not None:
        request.prompt_token_ids.extend(body.prompt_token_ids)
    elif prompt is not None:
        request.prompt = prompt
    s = request.sampling
    for name in ("temperature", "top_p", "max_tokens", "repetition_penalty"):
        value = getattr(body, name)
        if value is not None:
            setattr(s, name, value)
    if body.seed is not None:
        s.seed = body.seed % (1 << 64)  # uint64: a negative seed as its two's complement
    s.top_k = body.top_k
    s.stop.extend(body.stop)
    for name, weight in body.mix:
        request.mix.add(adapter=name, weight=weight)
    return request


def openai_param(field: str, chat: bool) -> str:
    """A gRPC request field (`sampling.max_tokens`, `adapter`, `mix[1].weight`) by the body's name for it."""
    param = field
    for old, new in _RENAMED.items():
        if param.startswith(old):
            param = new + param[len(old) :]
    if chat and param == "prompt":
        param = "messages"
    return param


# check_request's reasons that speak of gRPC fields, in the body's terms.
_HTTP_REASONS = {
    ("mix", "and adapter are mutually exclusive"): (
        "cannot go with an adapter as `model`: with a mix, `model` is the base model (or a saved mix's name "
        "alone, without `mix`)"
    ),
    ("prompt", "must not be empty (set prompt or prompt_token_ids)"): "must not be empty",
}


def openai_field_error(error: RequestFieldError, chat: bool) -> BodyError:
    """check_request's refusal in the body's own field names (and words, where its reason names gRPC's)."""
    reason = _HTTP_REASONS.get((error.field, error.reason), error.reason)
    if error.reason == BASE_MEMBER_RULE:  # a member named as the base model (or "") in a mix of deltas
        reason = 'is the base model, which only an ensemble may hold (`mix_method` "ensemble")'
    return BodyError(openai_param(error.field, chat), reason)


def _load(data: bytes, allowed: set[str]) -> JsonObject:
    values = data.count(b",") + data.count(b"{") + data.count(b"[")  # an upper bound on nested values - 1
    if values > MAX_BODY_VALUES:
        raise BodyError(
            None, f"the body holds more than {MAX_BODY_VALUES} commas and brackets (JSON values, or text)"
        )
    try:
        value = load_json(data, "", max_bytes=MAX_BODY_BYTES, mark_out_of_range=True)
    except LoneSurrogate as error:  # refused by the field holding it, as a number out of range is
        what = "has a key holding" if error.in_key else "holds"
        subject = "" if error.path else "the body "  # a field error's message starts with its name
        raise BodyError(
            error.path or None,
            f"{subject}{what} a lone surrogate (\\u{error.code_point:04x}), which is not a character",
        ) from None
    except JsonFieldError as error:
        raise BodyError(None, f"the body is {error.reason}") from None
    if not isinstance(value, dict):
        raise BodyError(None, f"the body must be a JSON object, got {_json_kind(value)}")
    obj = JsonObject(value, "", whole_floats=True)  # every integer field takes 4.0 as 4, and no field 4.5
    for key, value in obj.data.items():
        if key not in allowed:
            raise BodyError(key, "is not supported by this server")
        if key in _NEUTRAL and value is not None and not _same(value, _NEUTRAL[key]):
            raise BodyError(key, f"is not supported with a value other than {_NEUTRAL[key]!r}")
    return obj


def _json_kind(value: object) -> str:
    """What a JSON value is, by JSON's names."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float | OutOfRangeNumber):
        return "a number"
    return {str: "a string", list: "an array"}.get(type(value), "null")


def _same(value: object, neutral: object) -> bool:
    """`value == neutral`, except that a bool is never a number (`"n": true` is not `"n": 1`)."""
    if isinstance(value, bool) or isinstance(neutral, bool):
        return type(value) is type(neutral) and value == neutral
    return value == neutral


def _body(
    obj: JsonObject,
    prompt: str | None,
    prompt_ids: tuple[int, ...] | None,
    messages: tuple[dict[str, str], ...],
    logprobs: bool,
    max_tokens: int | None,
) -> Body:
    model = obj.get_str("model", max_chars=256)
    stream = obj.get_bool("stream", False)
    options = obj.get_object("stream_options")
    for key in options.data:
        if key != "include_usage":
            raise BodyError(f"stream_options.{key}", "is not supported by this server")
    include_usage = options.get_bool("include_usage", False)
    if "include_usage" in options and not stream:
        raise BodyError("stream_options", "is only allowed with stream: true")
    obj.get_str("user", "", max_chars=256)
    seed = obj.get_int("seed", None, lo=MIN_SEED, hi=MAX_SEED)
    body = Body(
        model=model,
        stream=stream,
        include_usage=include_usage,
        prompt=prompt,
        prompt_token_ids=prompt_ids,
        messages=messages,
        max_tokens=max_tokens,
        temperature=_float32(obj, "temperature", temperature_problem, keep_nonzero=False),
        top_p=_float32(obj, "top_p", top_p_problem),
        top_k=obj.get_int("top_k", 0, lo=0, hi=1 << 30),
        repetition_penalty=_float32(obj, "repetition_penalty", penalty_problem),
        seed=seed,
        stop=_stop(obj),
        logprobs=logprobs,
        mix=_mix(obj),
        mix_method=obj.get_str("mix_method", "linear", max_chars=32),
        density=_float32(obj, "density", density_problem),
        majority_sign_method=obj.get_str("majority_sign_method", "", max_chars=32),
        combine=obj.get_str("combine", "", max_chars=32),
    )
    if not model:
        raise BodyError("model", "must not be empty")
    return body


def _float32(
    obj: JsonObject,
    key: str,
    problem: Callable[[float], str | None],
    keep_nonzero: bool = True,
    default: float | None = None,
) -> float | None:
    """The number `obj[key]` checked by `problem` as the client sent it, then made one a float32 field
    holds as sent: past float32's largest value it is refused naming that maximum; `keep_nonzero` (a
    field that refuses 0) raises a nonzero value float32 would round to 0 to its smallest normal value."""
    value = obj.get_number(key, default)
    if value is None:
        return None
    reason = problem(value)
    if reason is not None:
        raise BodyError(obj.field(key), reason)
    if abs(value) > _FLOAT32_MAX:
        raise BodyError(obj.field(key), f"must be at most {_FLOAT32_MAX:g} in magnitude, got {value:g}")
    if keep_nonzero and 0 < abs(value) < _FLOAT32_MIN_NORMAL:
        return math.copysign(_FLOAT32_MIN_NORMAL, value)
    return value


def _prompt(obj: JsonObject) -> tuple[str | None, tuple[int, ...] | None]:
    """A string, a list of one string, a list of token ids, or a list of one list of token ids."""
    value = obj.data.get("prompt")
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str | list):
        value = value[0]
    if isinstance(value, str):
        return value, None
    if isinstance(value, list) and len(value) > MAX_PROMPT_TOKEN_IDS:
        raise BodyError("prompt", f"must hold at most {MAX_PROMPT_TOKEN_IDS} token ids, got {len(value)}")
    token_ids = [whole_number(v) for v in value] if isinstance(value, list) else []
    if token_ids and None not in token_ids:
        if not all(0 <= v < 1 << 31 for v in token_ids):
            raise BodyError("prompt", "token ids must be in [0, 2^31)")
        return None, tuple(token_ids)
    if value is None:
        raise BodyError("prompt", "is required")
    raise BodyError(
        "prompt", f"must be a string or a list of token ids (one prompt per request), got {describe(value)}"
    )


def _messages(obj: JsonObject) -> tuple[dict[str, str], ...]:
    value = obj.data.get("messages")
    if not isinstance(value, list) or not value:
        raise BodyError("messages", "must be a non-empty list of messages")
    if len(value) > MAX_MESSAGES:
        raise BodyError("messages", f"must hold at most {MAX_MESSAGES} messages")
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise BodyError(where, f"must be an object, got {describe(message)}")
        for key in message:
            if key in _NULL_MESSAGE_FIELDS and message[key] is None:
                continue
            if key not in ("role", "content", "name"):
                raise BodyError(f"{where}.{key}", "is not supported by this server")
        name = message.get("name")
        if name is not None and not (isinstance(name, str) and len(name) <= 256):
            raise BodyError(
                f"{where}.name", f"must be a string of at most 256 characters, got {describe(name)}"
            )
        role = message.get("role")
        if role not in _ROLES:
            raise BodyError(f"{where}.role", f"must be one of {', '.join(_ROLES)}, got {describe(role)}")
        rendered = {"role": role, "content": _content(message.get("content"), f"{where}.content")}
        if name is not None:  # the template's to use, as transformers passes it (most ignore it)
            rendered["name"] = name
        messages.append(rendered)
    return tuple(messages)


def _content(value: object, where: str) -> str:
    """A string, or a list of text parts joined by newlines, as vLLM joins them for a template that reads a
    message's content as a string."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if len(value) > MAX_CONTENT_PARTS:
            raise BodyError(where, f"must hold at most {MAX_CONTENT_PARTS} parts, got {len(value)}")
        texts = []
        for j, part in enumerate(value):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise BodyError(f"{where}[{j}]", "must be a text part ({'type': 'text', 'text': ...})")
            for key in part:
                if key not in ("type", "text"):
                    raise BodyError(f"{where}[{j}].{key}", "is not supported by this server")
            texts.append(part["text"])
        return "\n".join(texts)
    raise BodyError(where, f"must be a string or a list of text parts, got {describe(value)}")


def _stop(obj: JsonObject) -> tuple[str, ...]:
    value = obj.data.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):  # checked here: the request check would name it `stop[0]`
        if not 0 < len(value) <= MAX_STOP_CHARS:
            raise BodyError("stop", f"must be 1..{MAX_STOP_CHARS} characters, got {len(value)}")
        return (value,)
    if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:
        raise BodyError("stop", f"must hold at most {MAX_STOP_STRINGS} strings, got {len(value)}")
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise BodyError("stop", f"must be a string or a list of strings, got {describe(value)}")


def _mix(obj: JsonObject) -> tuple[tuple[str, float], ...]:
    """`{"a": 0.5, "b": 0.5}` or `[{"adapter": "a", "weight": 0.5}, ...]`."""
    value = obj.data.get("mix")
    if value is None:
        return ()
    if isinstance(value, dict | list) and not 1 <= len(value) <= MAX_MIX_ADAPTERS:
        raise BodyError("mix", f"must hold 1 to {MAX_MIX_ADAPTERS} adapters, got {len(value)}")
    if isinstance(value, dict):
        for i, (name, weight) in enumerate(value.items()):
            if weight is None:  # the object form's value is the weight itself: none is no default
                raise BodyError(f"mix[{i}].weight", f"of {describe(name)} must be a number, got null")
        items = [{"adapter": name, "weight": weight} for name, weight in value.items()]
    elif isinstance(value, list):
        items = value
    else:
        raise BodyError("mix", "must be an object of adapter weights or a list of {adapter, weight}")
    if not items or len(items) > MAX_MIX_ADAPTERS:
        raise BodyError("mix", f"must hold 1 to {MAX_MIX_ADAPTERS} adapters")
    mix = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise BodyError(f"mix[{i}]", "must be an object {adapter, weight}")
        for key in item:
            if key not in ("adapter", "weight"):
                raise BodyError(f"mix[{i}].{key}", "is not supported by this server")
        member = JsonObject(item, f"mix[{i}]", whole_floats=True)
        weight = _float32(member, "weight", lambda w: weight_problem(w, None), default=1.0)
        mix.append((member.get_str("adapter", max_chars=256), weight))
    return tuple(mix)


def _enum(enum, prefix: str, param: str, name: str) -> int:
    """The value of `prefix + NAME` in a protobuf enum; "" is its unspecified default, which is not a
    name a body may send ("unspecified" would turn off the checks of the option)."""
    if not name:
        return 0
    names = [value.name for value in enum.DESCRIPTOR.values]
    known = [n.removeprefix(prefix).lower() for n in names if not n.endswith("UNSPECIFIED")]
    if name.lower() not in known:
        raise BodyError(param, f"is unknown ({describe(name)}); one of {', '.join(known)}")
    return enum.Value(prefix + name.upper())
