"""Bodies a hostile caller sends to make parsing expensive or to slip options past the checks: lists are
measured before any per-element work, and every field is checked for what it is."""

from __future__ import annotations

import json

import pytest

from data_plane.server.openai_http.schemas import (
    MAX_PROMPT_TOKEN_IDS,
    BodyError,
    parse_chat,
    parse_completion,
)
from data_plane.server.validation import RequestLimits, check_request
from openlora.v1 import inference_pb2


def _completion(**fields) -> bytes:
    return json.dumps({"model": "m", "prompt": "hi", **fields}).encode()


def _chat(messages, **fields) -> bytes:
    return json.dumps({"model": "m", "messages": messages, **fields}).encode()


@pytest.mark.parametrize(
    "data,param",
    [
        (_completion(prompt=[1] * (MAX_PROMPT_TOKEN_IDS + 1)), "prompt"),
        (_completion(prompt=[[1] * 1_000_000]), "prompt"),
        (_completion(mix={f"a{i}": 1.0 for i in range(150_000)}), "mix"),
        (_completion(mix=[{"adapter": f"a{i}", "weight": 1} for i in range(100_000)]), "mix"),
        (_completion(stop=["x"] * 500_000), "stop"),
        (
            _chat([{"role": "user", "content": [{"type": "text", "text": "a"}] * 100_000}]),
            "messages[0].content",
        ),
    ],
)
def test_oversized_lists_are_refused_naming_the_field(data, param):
    parse = parse_chat if b'"messages"' in data else parse_completion
    with pytest.raises(BodyError) as refused:
        parse(data)
    assert refused.value.param == param


def test_a_million_token_ids_are_refused_without_checking_each(monkeypatch):
    """Measured by what the parser does, not by time: the per-id check never runs."""
    from data_plane.server.openai_http import schemas

    calls = []
    checked = schemas.whole_number
    monkeypatch.setattr(schemas, "whole_number", lambda v: calls.append(v) or checked(v))
    with pytest.raises(BodyError):
        parse_completion(_completion(prompt=[7] * 1_300_000))
    assert calls == []


@pytest.mark.parametrize(
    "data,param",
    [
        (_completion(n=True), "n"),
        (_completion(best_of=True), "best_of"),
        (_completion(echo=0), "echo"),
        (_completion(mix=[{"adapter": "a", "weight": 1, "extra": 1}]), "mix[0].extra"),
        (_chat([{"role": "user", "content": "hi", "name": 5}]), "messages[0].name"),
        (_chat([{"role": "user", "content": "hi", "name": "x" * 257}]), "messages[0].name"),
        # A string stop is `stop`, not `stop[0]` (the list's element, as the request check names it).
        (_completion(stop=""), "stop"),
        (_completion(stop="x" * 10_000), "stop"),
    ],
)
def test_fields_of_the_wrong_kind_are_refused(data, param):
    parse = parse_chat if b'"messages"' in data else parse_completion
    with pytest.raises(BodyError) as refused:
        parse(data)
    assert refused.value.param == param


def test_neutral_values_as_clients_send_them_are_accepted():
    parse_completion(_completion(n=1, presence_penalty=0.0, frequency_penalty=0, echo=False))
    parse_chat(_chat([{"role": "user", "content": "hi", "name": "alice"}], n=1))


LIMITS = RequestLimits(max_tokens_limit=512, default_max_tokens=16, vocab_size=256, max_model_len=512)


def test_the_documented_minimum_density_is_accepted_over_grpc():
    """The float32 field carries 1e-4 as 9.99999975e-05; the minimum sent as documented is served."""
    request = inference_pb2.GenerateRequest(
        prompt="hi",
        mix=[inference_pb2.AdapterWeight(adapter=a, weight=0.5) for a in ("a", "b")],
        mix_method=inference_pb2.MIX_METHOD_TIES,
        density=0.0001,
    )
    assert check_request(request, LIMITS).density == pytest.approx(1e-4)
    request.density = 0.00009
    with pytest.raises(Exception, match="density"):
        check_request(request, LIMITS)


def test_a_merge_method_without_a_mix_is_refused():
    request = inference_pb2.GenerateRequest(prompt="hi", mix_method=inference_pb2.MIX_METHOD_TIES)
    with pytest.raises(Exception, match="mix_method"):
        check_request(request, LIMITS)
    check_request(
        inference_pb2.GenerateRequest(prompt="hi", mix_method=inference_pb2.MIX_METHOD_LINEAR), LIMITS
    )


def test_a_body_of_millions_of_values_is_refused_before_it_is_parsed(monkeypatch):
    """Counted from its commas and brackets: the parser, a Python call per value, never sees it."""
    from data_plane.server.openai_http import schemas

    calls = []
    monkeypatch.setattr(schemas, "load_json", lambda *a, **k: calls.append(a))
    with pytest.raises(BodyError, match="JSON values"):
        parse_completion(b"[" + b"{}," * 1_400_000 + b"{}]")
    with pytest.raises(BodyError, match="JSON values"):
        parse_completion(_completion(prompt=[7] * 2_000_000))
    assert calls == []
