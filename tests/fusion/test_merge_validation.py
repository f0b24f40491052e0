"""The mix fields of a GenerateRequest: each bad value is refused naming its field, good ones kept."""

from __future__ import annotations

import math

import pytest

from data_plane.server.validation import RequestFieldError, RequestLimits, check_request
from openlora.v1 import inference_pb2

LIMITS = RequestLimits(max_tokens_limit=256, default_max_tokens=16, vocab_size=100, max_model_len=64)


def _request(mix=(("a", 0.6), ("b", 0.4)), method=inference_pb2.MIX_METHOD_TIES, **fields):
    request = inference_pb2.GenerateRequest(prompt="x", mix_method=method, **fields)
    for name, weight in mix:
        request.mix.add(adapter=name, weight=weight)
    return request


def _refused_field(request: inference_pb2.GenerateRequest) -> str:
    with pytest.raises(RequestFieldError) as caught:
        check_request(request, LIMITS)
    return caught.value.field


@pytest.mark.parametrize(
    ("method", "name"),
    [
        (inference_pb2.MIX_METHOD_TIES, "ties"),
        (inference_pb2.MIX_METHOD_DARE_LINEAR, "dare_linear"),
        (inference_pb2.MIX_METHOD_DARE_TIES, "dare_ties"),
        (inference_pb2.MIX_METHOD_MAGNITUDE_PRUNE, "magnitude_prune"),
    ],
)
def test_merge_methods_are_accepted_with_their_options(method, name):
    sign = inference_pb2.MAJORITY_SIGN_METHOD_FREQUENCY if name in ("ties", "dare_ties") else 0
    valid = check_request(_request(method=method, density=0.5, majority_sign_method=sign), LIMITS)
    assert valid.mix_method == name and valid.is_merge and not valid.is_ensemble
    assert math.isclose(valid.density, 0.5)
    assert valid.majority_sign_method == ("frequency" if sign else "total")
    assert valid.adapters == (("a", pytest.approx(0.6)), ("b", pytest.approx(0.4)))


def test_merge_defaults_are_peft_defaults():
    valid = check_request(_request(), LIMITS)
    assert (valid.density, valid.majority_sign_method) == (1.0, "total")


def test_ensemble_may_hold_the_base_model_and_a_combine():
    valid = check_request(
        _request(
            mix=(("", 1.0), ("a", 1.0)),
            method=inference_pb2.MIX_METHOD_ENSEMBLE,
            combine=inference_pb2.ENSEMBLE_COMBINE_LOGPROBS,
        ),
        LIMITS,
    )
    assert valid.is_ensemble and valid.combine == "logprobs"
    assert valid.adapters == (("", 1.0), ("a", 1.0))


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (_request(method=7), "mix_method"),
        (_request(density=0.0), "density"),
        (_request(density=1.4e-45), "density"),  # DARE's 1 / density turned kept values infinite
        (_request(density=1.5), "density"),
        (_request(density=-0.1), "density"),
        (_request(density=math.nan), "density"),
        (_request(method=inference_pb2.MIX_METHOD_LINEAR, density=0.5), "density"),
        (_request(mix=(), density=0.5, method=inference_pb2.MIX_METHOD_LINEAR), "density"),
        (_request(mix=(), density=0.5), "mix_method"),  # a merge method without a mix
        (_request(majority_sign_method=9), "majority_sign_method"),
        (
            _request(
                method=inference_pb2.MIX_METHOD_MAGNITUDE_PRUNE,
                majority_sign_method=inference_pb2.MAJORITY_SIGN_METHOD_FREQUENCY,
            ),
            "majority_sign_method",
        ),
        (_request(combine=inference_pb2.ENSEMBLE_COMBINE_LOGPROBS), "combine"),
        (_request(method=inference_pb2.MIX_METHOD_ENSEMBLE, combine=5), "combine"),
        (_request(mix=[(f"a{i}", 1.0) for i in range(9)]), "mix"),
        (_request(mix=(("a", 0.5), ("b", 0.2), ("a", 0.3))), "mix[2].adapter"),
        (_request(mix=(("", 0.5), ("a", 0.5))), "mix[0].adapter"),
        (
            _request(mix=(("", 0.5), ("", 0.5)), method=inference_pb2.MIX_METHOD_ENSEMBLE),
            "mix[1].adapter",
        ),
        (_request(mix=(("a", math.inf), ("b", 0.5))), "mix[0].weight"),
        (_request(mix=(("a", 0.5), ("b", math.nan))), "mix[1].weight"),
        (_request(mix=(("a", 0.0), ("b", 0.0))), "mix"),
        (_request(mix=(("a", 0.0), ("b", 0.0)), method=inference_pb2.MIX_METHOD_LINEAR), "mix"),
        (
            _request(mix=(("a", -0.5), ("b", 1.0)), method=inference_pb2.MIX_METHOD_ENSEMBLE),
            "mix[0].weight",
        ),
        (_request(adapter="c"), "mix"),
    ],
)
def test_bad_mix_fields_are_refused_by_name(request_, field):
    assert _refused_field(request_) == field


def test_eight_members_are_accepted_and_nine_refused():
    eight = check_request(_request(mix=[(f"a{i}", 1.0) for i in range(8)]), LIMITS)
    assert len(eight.adapters) == 8
    assert _refused_field(_request(mix=[(f"a{i}", 1.0) for i in range(9)])) == "mix"


def test_negative_merge_weights_are_kept_as_peft_does():
    valid = check_request(_request(mix=(("a", -0.5), ("b", 1.0))), LIMITS)
    assert valid.adapters == (("a", -0.5), ("b", 1.0))
