"""Typed errors of the OpenLoRA Python client, one per gRPC status a caller can act on."""

from __future__ import annotations

import grpc


class OpenLoRAError(Exception):
    """Base of every client error; `code` is the gRPC status code, `details` the server's message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(details)
        self.details = details
        if code is not None:
            self.code = code


class InvalidArgument(OpenLoRAError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(OpenLoRAError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(OpenLoRAError):
    code = grpc.StatusCode.PERMISSION_DENIED


class NotFound(OpenLoRAError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(OpenLoRAError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(OpenLoRAError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(OpenLoRAError):
    code = grpc.StatusCode.UNAVAILABLE


class Cancelled(OpenLoRAError):
    code = grpc.StatusCode.CANCELLED


class DeadlineExceeded(OpenLoRAError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


_BY_CODE: dict[grpc.StatusCode, type[OpenLoRAError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        Unauthenticated,
        PermissionDenied,
        NotFound,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
        Cancelled,
        DeadlineExceeded,
    )
}


def from_rpc_error(error: grpc.RpcError) -> OpenLoRAError:
    """The typed error for a failed call (OpenLoRAError itself for codes without their own class)."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else None) or str(code)
    cls = _BY_CODE.get(code, OpenLoRAError)
    return cls(details, code)
