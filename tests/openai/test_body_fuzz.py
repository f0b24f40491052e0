"""Promise: the HTTP API's body parsers either give a Body that becomes a checked request, or refuse with
BodyError (a 400 naming the field); never another exception, whatever the bytes."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_plane.server.openai_http.schemas import (
    BodyError,
    openai_field_error,
    parse_chat,
    parse_completion,
    to_generate_request,
)
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


def _root(param: str) -> str:
    """The body's own field a parameter lies in: `messages` for `messages[0].content`."""
    return re.split(r"[.\[]", param, maxsplit=1)[0]


def _parse_and_check(parse, sent: dict) -> None:
    """Parses `sent` as JSON: a refusal names one of its fields, or a required field it lacks."""
    chat = parse is parse_chat
    named = {*sent, "model", "messages" if chat else "prompt"}
    try:
        body = parse(json.dumps(sent).encode())
    except BodyError as refused:
        assert refused.param and _root(refused.param) in named, (refused.param, str(refused))
        assert str(refused).startswith(f"{refused.param} "), str(refused)
        return
    try:
        check_request(to_generate_request(body, body.prompt or "text", "", ""), LIMITS)
    except RequestFieldError as error:  # answered as the body's field (openai_field_error)
        refused = openai_field_error(error, chat)
        assert refused.param and _root(refused.param) in named, (error.field, refused.param, str(error))


@FUZZ
@given(_bodies)
def test_completion_bodies_parse_or_are_refused_by_name(fields):
    _parse_and_check(parse_completion, fields)


@FUZZ
@given(_bodies)
def test_chat_bodies_parse_or_are_refused_by_name(fields):
    _parse_and_check(parse_chat, fields)


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_are_refused_as_a_body(data):
    for parse in (parse_completion, parse_chat):
        with pytest.raises(BodyError):
            parse(data)


def test_deep_nesting_is_a_body_error():
    deep = b'{"model": "m", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for parse in (parse_completion, parse_chat):
        with pytest.raises(BodyError, match="nested deeper"):
            parse(deep)
