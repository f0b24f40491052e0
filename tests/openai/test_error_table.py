"""Every domain error has one HTTP status (beside its gRPC status), and the official client raises the
class that status means."""

from __future__ import annotations

import grpc
import httpx
import openai
import pytest

from data_plane.engine.errors import AdapterLoadError, EngineDead, InvalidRequest, QueueFull, StepFailed
from data_plane.server.artifact_store import ArtifactError
from data_plane.server.control_plane_client import ControlPlaneError
from data_plane.server.errors import (
    Draining,
    DuplicateRequest,
    LocalCopyFailed,
    MissingCredentials,
    MissingScope,
    ModelNotFound,
    RequestIdUsed,
    status_for,
)
from data_plane.server.openai_http.errors import http_error
from data_plane.server.openai_http.schemas import BodyError

CASES = [
    (BodyError("n", "is not supported"), 400, openai.BadRequestError),
    (AdapterLoadError("rank", "too large"), 400, openai.BadRequestError),
    (MissingCredentials(), 401, openai.AuthenticationError),
    (ControlPlaneError(grpc.StatusCode.UNAUTHENTICATED, "unknown api key"), 401, openai.AuthenticationError),
    (MissingScope(), 403, openai.PermissionDeniedError),
    (ControlPlaneError(grpc.StatusCode.NOT_FOUND, "adapter: 'x' not found"), 404, openai.NotFoundError),
    (ModelNotFound("x"), 404, openai.NotFoundError),
    (DuplicateRequest("r1"), 409, openai.ConflictError),
    (RequestIdUsed("r1"), 409, openai.ConflictError),
    (QueueFull("2 waiting"), 429, openai.RateLimitError),
    (Draining(), 503, openai.InternalServerError),
    (EngineDead("stopped"), 503, openai.InternalServerError),
    (ArtifactError("fetch failed"), 503, openai.InternalServerError),
    (LocalCopyFailed(AdapterLoadError("adapter", "damaged header")), 503, openai.InternalServerError),
    (StepFailed("step failed"), 500, openai.InternalServerError),
    (RuntimeError("a bug"), 500, openai.InternalServerError),
]


@pytest.mark.parametrize(("error", "status", "exception"), CASES, ids=lambda v: type(v).__name__)
def test_each_domain_error_has_its_http_status_and_client_exception(error, status, exception):
    failure = http_error(error)
    assert failure.status == status
    mapped = status_for(error)
    if isinstance(error, ModelNotFound):  # OpenAI's own code for it, which clients test for
        assert failure.code == "model_not_found"
    else:
        assert failure.code == (mapped[0].name.lower() if mapped else "internal")
    payload = failure.payload()["error"]
    assert set(payload) == {"message", "type", "param", "code"}
    if status == 500:
        assert payload["message"] == "internal error" or "logged" in payload["message"]
    response = httpx.Response(status, json=failure.payload(), request=httpx.Request("POST", "http://x/v1"))
    client = openai.OpenAI(api_key="k", base_url="http://x/v1")
    raised = client._make_status_error(payload["message"], body=payload, response=response)
    assert type(raised) is exception
    assert ("Retry-After" in failure.headers()) == (status in (429, 503))


@pytest.mark.parametrize(
    "error", [DuplicateRequest("r1"), RequestIdUsed("r1")], ids=lambda e: type(e).__name__
)
def test_the_official_client_does_not_retry_a_duplicate_request_id(error):
    """The official clients retry a 409 twice by default, with the same X-Request-Id, so a duplicate took
    three requests and a second or more of backoff to raise ConflictError: the answer says not to."""
    failure = http_error(error)
    request = httpx.Request("POST", "http://x/v1/completions")
    response = httpx.Response(
        failure.status, json=failure.payload(), headers=failure.headers(), request=request
    )
    client = openai.OpenAI(api_key="k", base_url="http://x/v1")
    assert not client._should_retry(response)
    retried = httpx.Response(
        429, json={}, headers=http_error(QueueFull("2 waiting")).headers(), request=request
    )
    assert client._should_retry(retried)  # an overload is still retried, after its Retry-After


def test_a_request_id_error_names_the_header():
    assert http_error(DuplicateRequest("r1")).param == "X-Request-Id"
    assert http_error(RequestIdUsed("r1")).param == "X-Request-Id"


def test_a_field_error_names_its_param():
    assert http_error(BodyError("messages[0].role", "must be one of user")).param == "messages[0].role"
    assert http_error(BodyError(None, "the body is not valid JSON")).param is None


@pytest.mark.parametrize(
    ("error", "chat", "param"),
    [
        (InvalidRequest("sampling.max_tokens", "must lie in [1, 64]"), False, "max_tokens"),
        (InvalidRequest("prompt", "produced non-finite logits"), False, "prompt"),
        (InvalidRequest("prompt", "produced non-finite logits"), True, "messages"),
        (InvalidRequest("adapter", "produced non-finite logits"), False, "model"),
        (InvalidRequest("mix", "produced non-finite logits"), False, "mix"),
        (ModelNotFound("../../etc/passwd"), False, "model"),
    ],
)
def test_an_error_from_past_the_body_names_the_body_field(error, chat, param):
    """Errors raised by the engine (gRPC field names) or by resolving `model` name the body's field; they
    answered param null before."""
    assert http_error(error, chat).param == param
