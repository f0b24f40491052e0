"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the HTTP status that
`data_plane.server.errors.http_status_for` gives the domain error (the one table, beside `status_for`)."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.responses import JSONResponse

from data_plane.engine.errors import InvalidRequest
from data_plane.server.control_plane_client import ControlPlaneError
from data_plane.server.errors import DuplicateRequest, ModelNotFound, RequestIdUsed, http_status_for
from data_plane.server.openai_http.schemas import BodyError, openai_param
from data_plane.server.validation import RequestFieldError

# OpenAI's error `type` for each status (its clients raise by status; the type is for people). OpenAI
# answers an unknown model and an unknown route with a 404 of type `invalid_request_error`.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    431: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}
# OpenAI's `code` for a `model` (or mix member) that does not exist or that the key may not use.
MODEL_NOT_FOUND = "model_not_found"
# Statuses a client should retry after a pause: overloaded, draining.
RETRY_AFTER_S = {429: 1, 503: 1}
# Statuses the official clients retry by default that no retry can change: a 409 is a request id in flight
# or already billed, which the retry sends again (the SDKs honour `x-should-retry`).
NEVER_RETRY = {409}


class MixMemberNotFound(Exception):
    """`mix[index].adapter` names nothing the key may use (another tenant's private adapter looks the
    same): 404 naming that field, as `ModelNotFound` names `model`."""

    def __init__(self, index: int, name: str) -> None:
        super().__init__(f"mix[{index}].adapter {name!r} not found")
        self.param = f"mix[{index}].adapter"


class ModelPartNotFound(Exception):
    """`model` names a saved mix one of whose adapters the key may no longer use (deleted, or made private
    by its owner): 404 naming `model`, with the control plane's words for the missing adapter."""

    def __init__(self, model: str, reason: str) -> None:
        super().__init__(f"model {model!r}: {reason}")


@dataclass(frozen=True)
class HttpError:
    status: int
    message: str
    param: str | None
    # The gRPC status name of the same outcome, lowercase ("invalid_argument"); OpenAI's own code where
    # its clients know one (`model_not_found`).
    code: str

    def payload(self) -> dict:
        kind = _TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        retry_s = RETRY_AFTER_S.get(self.status)
        if retry_s:
            return {"Retry-After": str(retry_s)}
        return {"x-should-retry": "false"} if self.status in NEVER_RETRY else {}

    def response(self, extra_headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.payload(), self.status, headers={**self.headers(), **(extra_headers or {})})


def http_error(error: BaseException, chat: bool = False) -> HttpError:
    """The HTTP error of any exception of the generate path (500 'internal error' for a worker fault), its
    `param` the body's name of the field at fault (`model` for an adapter nobody may use)."""
    if isinstance(error, MixMemberNotFound):
        return HttpError(404, str(error), error.param, MODEL_NOT_FOUND)
    if isinstance(error, ModelPartNotFound):
        return HttpError(404, str(error), "model", MODEL_NOT_FOUND)
    status, message, code = http_status_for(error)
    param = None
    if isinstance(error, BodyError):
        param = error.param
    elif isinstance(error, RequestFieldError | InvalidRequest) or (
        isinstance(error, ControlPlaneError) and error.field  # a refusal of a name the body sent
    ):  # the gRPC names: renamed
        param = openai_param(error.field, chat)
    elif isinstance(error, ModelNotFound):
        param, code = "model", MODEL_NOT_FOUND
    elif isinstance(error, DuplicateRequest | RequestIdUsed):  # the request id is the header's
        param = "X-Request-Id"
    return HttpError(status, message, param, code.lower())
