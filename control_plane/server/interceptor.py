"""The one place domain errors become gRPC status codes, and RPCs are counted and timed."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable

import grpc
import psycopg
from sqlalchemy import exc as sa_exc
from sqlalchemy.exc import DataError

from control_plane import errors, metrics
from control_plane.artifacts.store import ArtifactDamaged
from openlora.adapter_format import AdapterFormatError
from openlora.exhaustion import exhausted_resource
from openlora.text_rules import bounded_status

log = logging.getLogger(__name__)

_CODES: tuple[tuple[type[errors.DomainError], grpc.StatusCode], ...] = (
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.Cancelled, grpc.StatusCode.CANCELLED),
)
_OWN_SERVICES = "/openlora.v1."


def _database_unavailable(error: Exception) -> bool:
    """The database could not be reached or used (down, restarting, connection dropped, pool exhausted,
    a retryable operational failure): the caller may retry. Integrity and data errors are the input's."""
    if isinstance(error, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)):
        return True
    if isinstance(error, sa_exc.DisconnectionError):
        return True
    if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
        return True
    # Raw driver errors that no SQLAlchemy wrapper caught.
    return isinstance(error, (psycopg.OperationalError, psycopg.InterfaceError))


def status_of(error: Exception) -> tuple[grpc.StatusCode, str]:
    if _database_unavailable(error):
        log.warning("database unavailable: %s", error)
        return grpc.StatusCode.UNAVAILABLE, "the control plane's database is unavailable; retry later"
    resource = exhausted_resource(error)
    if resource is not None:  # overload (a burst of calls), not the caller's input nor a bug: retryable
        log.warning("out of %s: %s", resource, error)
        return (
            grpc.StatusCode.UNAVAILABLE,
            f"the control plane ran out of {resource}; retry shortly",
        )
    if isinstance(error, AdapterFormatError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    if isinstance(error, ArtifactDamaged):  # logged by the store; a retry cannot help, a re-upload does
        return grpc.StatusCode.DATA_LOSS, str(error)
    if isinstance(error, DataError):
        # Postgres refused a value (too long, NUL, out of range) that no check caught: still the input.
        log.warning("unchecked value refused by the database: %s", error.orig)
        return grpc.StatusCode.INVALID_ARGUMENT, "a value is too long or out of range for its field"
    for kind, code in _CODES:
        if isinstance(error, kind):
            return code, str(error)
    log.exception("unexpected error", exc_info=error)
    return grpc.StatusCode.INTERNAL, "internal error"


class _Outcome:
    def __init__(self, method: str) -> None:
        self.method = method
        self.code = grpc.StatusCode.OK
        self.started = time.perf_counter()

    def done(self) -> None:
        metrics.RPC_REQUESTS.labels(self.method, self.code.name).inc()
        metrics.RPC_SECONDS.labels(self.method).observe(time.perf_counter() - self.started)


async def _abort(outcome: _Outcome, context: grpc.aio.ServicerContext, error: Exception) -> None:
    outcome.code, message = status_of(error)
    await context.abort(outcome.code, bounded_status(message))


def _wrap_call(behavior: Callable, method: str) -> Callable:
    async def call(request, context):
        outcome = _Outcome(method)
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            outcome.code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        except Exception as e:
            await _abort(outcome, context, e)
        finally:
            outcome.done()

    return call


def _wrap_stream(behavior: Callable, method: str) -> Callable:
    async def stream(request, context):
        outcome = _Outcome(method)
        try:
            async for response in behavior(request, context):
                yield response
        except grpc.aio.AbortError:
            outcome.code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        except Exception as e:
            await _abort(outcome, context, e)
        finally:
            outcome.done()

    return stream


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every openlora.v1 handler: domain errors -> status codes, metrics per method."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(_OWN_SERVICES):
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(_wrap_call(handler.unary_unary, method), **kwargs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(_wrap_call(handler.stream_unary, method), **kwargs)
        if handler.unary_stream and inspect.isasyncgenfunction(handler.unary_stream):
            return grpc.unary_stream_rpc_method_handler(_wrap_stream(handler.unary_stream, method), **kwargs)
        return handler
