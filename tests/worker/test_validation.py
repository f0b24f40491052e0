"""Every request field the worker refuses before the engine sees it, each named in the error."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_plane.server.validation import (
    RequestFieldError,
    RequestLimits,
    check_prompt_length,
    check_request,
    requested_adapter_names,
)
from openlora.client import build_request
from openlora.text_rules import SERVING_KEY_SUFFIX
from openlora.v1 import inference_pb2

LIMITS = RequestLimits(max_tokens_limit=256, default_max_tokens=16, vocab_size=100, max_model_len=64)


def _refused_field(request: inference_pb2.GenerateRequest) -> str:
    with pytest.raises(RequestFieldError) as caught:
        check_request(request, LIMITS)
    assert caught.value.field in str(caught.value)
    return caught.value.field


def test_valid_request_keeps_its_values():
    valid = check_request(
        build_request(
            "hi", adapter="a", max_tokens=8, temperature=0.7, top_p=0.9, top_k=5, seed=3, stop=["x"]
        ),
        LIMITS,
    )
    assert valid.prompt == "hi" and valid.prompt_token_ids is None
    assert (valid.max_tokens, valid.top_k, valid.seed, valid.stop) == (8, 5, 3, ("x",))
    assert math.isclose(valid.temperature, 0.7, rel_tol=1e-6) and math.isclose(valid.top_p, 0.9, rel_tol=1e-6)
    assert valid.adapters == (("a", 1.0),)


def test_unset_sampling_takes_the_defaults():
    valid = check_request(build_request("hi"), LIMITS)
    assert (valid.temperature, valid.top_p, valid.max_tokens, valid.repetition_penalty) == (0.0, 1.0, 16, 1.0)
    assert valid.adapters == ()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "prompt_token_ids": [1]}, "prompt"),
        ({"prompt_token_ids": [1] * 64}, "prompt_token_ids"),
        ({"prompt_token_ids": [1, 100]}, "prompt_token_ids[1]"),
        ({"prompt_token_ids": [-1]}, "prompt_token_ids[0]"),
        ({"prompt": "x", "max_tokens": 0}, "sampling.max_tokens"),
        ({"prompt": "x", "max_tokens": 257}, "sampling.max_tokens"),
        ({"prompt": "x", "temperature": -0.1}, "sampling.temperature"),
        ({"prompt": "x", "temperature": math.nan}, "sampling.temperature"),
        ({"prompt": "x", "top_p": 1.5}, "sampling.top_p"),
        ({"prompt": "x", "top_p": 0.0}, "sampling.top_p"),
        ({"prompt": "x", "top_k": -1}, "sampling.top_k"),
        ({"prompt": "x", "repetition_penalty": 0.0}, "sampling.repetition_penalty"),
        ({"prompt": "x", "stop": [""]}, "sampling.stop[0]"),
        ({"prompt": "x", "mix": {"a": math.inf, "b": 0.5}}, "mix[0].weight"),
        ({"prompt": "x", "mix": {"a": 0.5, "b": math.nan}}, "mix[1].weight"),
        ({"prompt": "x", "mix": {"a": 3e38, "b": 0.5}}, "mix[0].weight"),  # finite, overflows K and V
        ({"prompt": "x", "mix": {"a": 0.5, "b": -1000.5}}, "mix[1].weight"),
        ({"prompt": "x", "mix": [("a", 0.5), ("a", 0.5)]}, "mix[1].adapter"),
        ({"prompt": "x", "mix": [("", 0.5)]}, "mix[0].adapter"),
        ({"prompt": "x", "adapter": "c", "mix": {"a": 0.5}}, "mix"),
        ({"prompt": "x", "request_id": "r" * 129}, "request_id"),
        ({"prompt": "x", "request_id": "r\x00"}, "request_id"),  # the usage record would be refused
        # Written into log lines and echoed in X-Request-Id: a line break would forge a log line.
        ({"prompt": "x", "request_id": "r\nINFO forged"}, "request_id"),
        ({"prompt": "x", "request_id": "r\r"}, "request_id"),
        ({"prompt": "x", "request_id": "a\x01b"}, "request_id"),
        ({"prompt": "x", "request_id": "a\tb"}, "request_id"),
        ({"prompt": "x", "request_id": "a\x7fb"}, "request_id"),
        ({"prompt": "x", "request_id": "a\x85b"}, "request_id"),
        ({"prompt": "x", "request_id": "a\u2028b"}, "request_id"),
        ({"prompt": "x", "adapter": "a/b"}, "adapter"),  # no adapter can have that name
        ({"prompt": "x", "adapter": ".."}, "adapter"),
        ({"prompt": "x", "adapter": "-a"}, "adapter"),
        ({"prompt": "x", "mix": {"ok": 0.5, ".": 0.5}}, "mix[1].adapter"),
        ({"prompt": "x", "mix": {"ok": 0.5, "b\x00": 0.5}}, "mix[1].adapter"),
    ],
)
def test_bad_field_is_refused_by_name(kwargs, field):
    prompt = kwargs.pop("prompt", None)
    assert _refused_field(build_request(prompt, **kwargs)) == field


def test_a_request_id_of_the_form_a_second_serving_is_billed_under_is_refused():
    """A second serving of an id (by another worker) is billed under `<id>~<16 hex>`: a client's id of that
    form could take that key, and the two servings would be merged into one bill."""
    from control_plane.usage.service import another_serving_id

    for request_id in (
        another_serving_id("r", "worker-1"),
        another_serving_id("x" * 128, "w"),
        "a~0123456789abcdef",
    ):
        with pytest.raises(RequestFieldError, match="request_id must not end in '~'"):
            check_request(build_request("x", request_id=request_id), LIMITS)
    for request_id in ("a~0123456789abcde", "a~0123456789ABCDEF", "a~0123456789abcdef-1", "~", "a~b"):
        assert check_request(build_request("x", request_id=request_id), LIMITS).request_id == request_id


def test_request_ids_of_any_printable_text_are_kept():
    for request_id in ("r-1", "ñandú 🦙", "a b", "日本語", "x" * 128, "a~b", "\u00a0nbsp"):
        assert check_request(build_request("x", request_id=request_id), LIMITS).request_id == request_id


def test_message_says_the_value_and_the_range():
    with pytest.raises(RequestFieldError, match=r"sampling\.top_p must be in \(0, 1\], got 1\.5"):
        check_request(build_request("x", top_p=1.5), LIMITS)


def test_unknown_mix_method_is_refused():
    request = build_request("x", mix={"a": 1.0})
    request.mix_method = 7
    assert _refused_field(request) == "mix_method"


def test_prompt_too_long_after_tokenizing_is_refused():
    check_prompt_length(63, LIMITS)
    with pytest.raises(RequestFieldError, match="prompt is too long: 64 tokens"):
        check_prompt_length(64, LIMITS)
    with pytest.raises(RequestFieldError, match="prompt must not be empty"):
        check_prompt_length(0, LIMITS)


def test_mix_keeps_the_weights_in_order():
    valid = check_request(build_request("x", mix=[("b", 0.25), ("a", 0.75)]), LIMITS)
    assert valid.adapters == (("b", 0.25), ("a", 0.75))
    assert requested_adapter_names(build_request("x", mix=[("b", 0.25), ("a", 0.75)])) == ("b", "a")


@settings(max_examples=300, deadline=None)
@given(request_id=st.text(max_size=160))
def test_every_request_id_the_worker_serves_is_one_the_control_plane_records(request_id):
    """A usage record the control plane refuses after the tokens went out is dead-lettered, unbilled: the
    worker refuses every request id the control plane's usage check would refuse, before serving. The
    worker refuses more only for control characters (which the control plane still records, for ids an
    older worker spooled)."""
    from control_plane.errors import InvalidArgument
    from control_plane.text import check_text
    from openlora.text_rules import MAX_REQUEST_ID_CHARS, text_problem

    try:
        check_request(build_request("x", request_id=request_id), LIMITS)
        served = True
    except RequestFieldError as error:
        assert error.field == "request_id"
        served = False
    if served and request_id:  # an empty id is the worker's to make
        check_text(request_id, "request_id", MAX_REQUEST_ID_CHARS)  # raises if the record would be refused
    if not served and text_problem(request_id, MAX_REQUEST_ID_CHARS) is not None:
        with pytest.raises(InvalidArgument):
            check_text(request_id, "request_id", MAX_REQUEST_ID_CHARS)
    elif not served:
        assert SERVING_KEY_SUFFIX.search(request_id) or any(
            ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or c in "\u2028\u2029" for c in request_id
        ), repr(request_id)
