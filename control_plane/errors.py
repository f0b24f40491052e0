"""Typed domain errors. Service modules raise them; one server interceptor maps each family to a gRPC
status code (see control_plane.server.interceptor). Nothing a caller can cause is INTERNAL."""

from __future__ import annotations


class DomainError(Exception):
    """Base of every caller-caused error; `field` names the request field at fault, when there is one."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class InvalidArgument(DomainError):
    """Bad input -> INVALID_ARGUMENT."""


class Unauthenticated(DomainError):
    """No, unknown or revoked credentials -> UNAUTHENTICATED."""


class PermissionDenied(DomainError):
    """Known caller without the scope or the right over the tenant -> PERMISSION_DENIED."""


class NotFound(DomainError):
    """Does not exist, or the caller may not see it (same message either way) -> NOT_FOUND."""


class AlreadyExists(DomainError):
    """-> ALREADY_EXISTS."""


class FailedPrecondition(DomainError):
    """The request is well formed but the system is not in a state to serve it -> FAILED_PRECONDITION."""


class ResourceExhausted(DomainError):
    """The caller (or all callers together) holds as much of a limited resource as allowed; retry when
    some is released -> RESOURCE_EXHAUSTED."""


class DeadlineExceeded(DomainError):
    """The caller took too long (a stream left idle past its limit) -> DEADLINE_EXCEEDED."""


class Cancelled(DomainError):
    """The caller cancelled the call before its work was committed; nothing of it was kept -> CANCELLED."""


class AdapterNotFound(NotFound):
    """Reads "<field>: '<name>' not found" (`adapter`, or the member's field of a mix)."""

    def __init__(self, name: str, field: str = "adapter") -> None:
        super().__init__(f"{name!r} not found", field=field)
        self.name = name


class TenantNotFound(NotFound):
    def __init__(self, name: str) -> None:
        super().__init__(f"{name!r} not found", field="tenant")
