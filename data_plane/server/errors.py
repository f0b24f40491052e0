"""The worker's request-level domain errors and the one place that maps every domain error to a status:
`status_for` gives the gRPC status code and message, `http_status_for` the HTTP status of the same
outcome (the OpenAI-compatible API). Nothing a caller can cause maps to INTERNAL / 500.
"""

from __future__ import annotations

import grpc

from data_plane.engine.errors import AdapterLoadError, EngineDead, InvalidRequest, QueueFull, StepFailed
from data_plane.fusion.builder import MergeWriteError
from data_plane.fusion.store import MergeQueueFull
from data_plane.server.artifact_store import ArtifactError, ArtifactRejected
from data_plane.server.control_plane_client import ControlPlaneError
from data_plane.server.validation import RequestFieldError
from openlora.exhaustion import exhausted_resource


class Draining(Exception):
    """The worker is shutting down and takes no new calls."""


class UsageUnrecordable(Exception):
    """The worker's usage spool cannot be written (disk full, read-only): it takes no new calls, since
    it could not bill them; its health is NOT_SERVING until a write succeeds again."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(cause)
        self.cause = cause


class LocalCopyFailed(Exception):
    """An adapter's files on this worker's disk failed to load. They passed their checks when they were
    stored, so they changed on this disk (a damaged byte, a truncated write); the worker dropped them, and
    a retry fetches them again, or builds the merge again (UNAVAILABLE, not the caller's adapter)."""

    def __init__(self, cause: AdapterLoadError) -> None:
        super().__init__(cause)
        self.cause = cause


class MissingCredentials(Exception):
    """The call carries no `authorization: Bearer <key>`."""


class MissingScope(Exception):
    """The key is valid but may not call InferenceService."""


class DuplicateRequest(Exception):
    """A call with the same tenant and request id is still in flight."""


class TenantStreamLimit(Exception):
    """The tenant already has as many streams on this worker as one tenant may (RESOURCE_EXHAUSTED)."""


class RequestIdUsed(Exception):
    """A finished call of this tenant was billed under this client request id (not yet reported)."""


class KeyRevoked(Exception):
    """The call's api key was revoked while its stream ran: the stream ends, billed for what it delivered."""


class ModelNotFound(Exception):
    """The `model` names nothing this key may use (another tenant's private adapter looks the same)."""


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status code and message for a domain error; None for a fault of the worker itself."""
    resource = exhausted_resource(error)
    if resource is not None:  # overload (a burst of calls), not the caller's input nor a bug: retryable
        return (
            grpc.StatusCode.UNAVAILABLE,
            f"the worker ran out of {resource}; retry shortly or on another worker",
        )
    if isinstance(error, RequestFieldError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    if isinstance(error, InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    if isinstance(error, LocalCopyFailed):
        return (
            grpc.StatusCode.UNAVAILABLE,
            f"this worker's copy of the adapter failed to load ({error.cause}) and was dropped; retry",
        )
    if isinstance(error, AdapterLoadError):
        return grpc.StatusCode.FAILED_PRECONDITION, f"adapter refused: {error}"
    if isinstance(error, ArtifactRejected):
        return grpc.StatusCode.FAILED_PRECONDITION, f"adapter refused by this worker: {error}"
    if isinstance(error, ArtifactError):
        return grpc.StatusCode.UNAVAILABLE, f"adapter download failed, retry: {error}"
    if isinstance(error, EngineDead):
        return grpc.StatusCode.UNAVAILABLE, "the worker's engine stopped; retry on another worker"
    if isinstance(error, StepFailed):  # a fault of the worker, logged with its traceback by the engine
        return grpc.StatusCode.INTERNAL, f"{error}; the worker logged the fault"
    if isinstance(error, MergeWriteError):  # this worker's disk, not the request: retry here or elsewhere
        return grpc.StatusCode.UNAVAILABLE, f"{error} or on another worker"
    if isinstance(error, MergeQueueFull):  # its message says which limit and what to retry
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)
    if isinstance(error, QueueFull):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "the worker's waiting queue is full; retry later"
    if isinstance(error, ControlPlaneError):
        return error.code, error.message
    if isinstance(error, Draining):
        return grpc.StatusCode.UNAVAILABLE, "the worker is draining; retry on another worker"
    if isinstance(error, UsageUnrecordable):
        return (
            grpc.StatusCode.UNAVAILABLE,
            f"the worker cannot record usage now (its usage spool: {error.cause.strerror or error.cause}); "
            "retry on another worker",
        )
    if isinstance(error, MissingCredentials):
        return (
            grpc.StatusCode.UNAUTHENTICATED,
            "missing 'authorization: Bearer <api key>' (gRPC metadata or HTTP header)",
        )
    if isinstance(error, KeyRevoked):
        return grpc.StatusCode.UNAUTHENTICATED, "the api key was revoked while this stream ran"
    if isinstance(error, MissingScope):
        return grpc.StatusCode.PERMISSION_DENIED, "the api key lacks the infer scope"
    if isinstance(error, ModelNotFound):
        return grpc.StatusCode.NOT_FOUND, f"model {error.args[0]!r} not found"
    if isinstance(error, TenantStreamLimit):
        return (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"this tenant already has {error.args[0]} streams on this worker, the most one tenant may have; "
            "retry when one ends",
        )
    if isinstance(error, DuplicateRequest):
        return grpc.StatusCode.ALREADY_EXISTS, f"request_id {error.args[0]!r} is already in flight"
    if isinstance(error, RequestIdUsed):
        return (
            grpc.StatusCode.ALREADY_EXISTS,
            # This worker holds its usage: spooled as a stream of it runs (checkpoints), or recorded since.
            f"request_id {error.args[0]!r} is already used: it is being served, or was served and billed; "
            "send a new request id",
        )
    return None


# The HTTP status of each gRPC status an outcome maps to (OpenAI's client picks its exception by it).
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def http_status_for(error: BaseException) -> tuple[int, str, str]:
    """(HTTP status, message, gRPC status name) of any error: the same outcome `status_for` gives
    gRPC; a fault of the worker itself is 500 'internal error'."""
    mapped = status_for(error)
    if mapped is None:
        return 500, "internal error", grpc.StatusCode.INTERNAL.name
    code, message = mapped
    return _HTTP_STATUS.get(code, 500), message, code.name


def names_unknown(message: str, name: str) -> bool:
    """Whether the control plane's NOT_FOUND `message` ("adapter: 'name' not found") is about the adapter
    `name`."""
    return bool(name) and message.endswith(f"adapter: {name!r} not found")


def names_other_base_model(message: str, name: str) -> bool:
    """Whether the control plane's FAILED_PRECONDITION `message` ("adapter: adapter 'name' was made for
    base model ...") refuses the adapter `name` as made for another base model."""
    return bool(name) and message.startswith(f"adapter: adapter {name!r} was made for base model ")


def mix_member_not_found(error: Exception, member_names: list[str]) -> ControlPlaneError | None:
    """The control plane's NOT_FOUND for the name of mix member i, or its FAILED_PRECONDITION for a member
    made for another base model (it names the field `adapter`: the control plane sees a list of names,
    not the request), as the request names it: `mix[i].adapter`. None when `error` is not such an answer."""
    if not isinstance(error, ControlPlaneError):
        return None
    for index, name in enumerate(member_names):
        field = f"mix[{index}].adapter"
        if error.code == grpc.StatusCode.NOT_FOUND and names_unknown(error.message, name):
            return ControlPlaneError(error.code, f"{field}: {name!r} not found", field)
        if error.code == grpc.StatusCode.FAILED_PRECONDITION and names_other_base_model(error.message, name):
            reason = error.message.removeprefix("adapter: ")
            return ControlPlaneError(error.code, f"{field}: {reason}", field)
    return None
