"""Promise: the HTTP API's body parsers either give a Body that becomes a checked request, or refuse with
BodyError (a 400 naming the field); never another exception, whatever the bytes."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_plane.server.openai_http.schemas import BodyError, parse_chat, parse_completion, to_generate_request
from data_plane.server.validation import RequestFieldError, RequestLimits, check_request

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LIMITS = RequestLimits(max_tokens_limit=256, default_max_tokens=16, vocab_size=128, max_model_len=64)
FIELDS = [
    "model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
    "seed", "stop", "logprobs", "top_logprobs", "user", "stream", "stream_options", "n", "mix", "mix_method",
    "repetition_penalty", "tools", "logit_bias", "echo",
]  # fmt: skip
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.sampled_from(
                [*FIELDS, "role", "content", "adapter", "weight", "type", "text", "include_usage"]
            ),
            inner,
            max_size=4,
        ),
    ),
    max_leaves=12,
)
_bodies = st.dictionaries(st.sampled_from(FIELDS), _values, max_size=8)


def _parse_and_check(parse, data: bytes) -> None:
    try:
        body = parse(data)
    except BodyError:
        return
    with contextlib.suppress(RequestFieldError):  # BodyError is one too
        check_request(to_generate_request(body, body.prompt or "text", "", ""), LIMITS)


@FUZZ
@given(_bodies)
def test_completion_bodies_parse_or_are_refused_by_name(fields):
    _parse_and_check(parse_completion, json.dumps(fields).encode())


@FUZZ
@given(_bodies)
def test_chat_bodies_parse_or_are_refused_by_name(fields):
    _parse_and_check(parse_chat, json.dumps(fields).encode())


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_are_refused_as_a_body(data):
    _parse_and_check(parse_completion, data)
    _parse_and_check(parse_chat, data)


def test_deep_nesting_is_a_body_error():
    deep = b'{"model": "m", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for parse in (parse_completion, parse_chat):
        with pytest.raises(BodyError, match="nested deeper"):
            parse(deep)
