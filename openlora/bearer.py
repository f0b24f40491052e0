"""The Bearer credential of a gRPC call's metadata, read alike by the worker and the control plane."""

from __future__ import annotations

from collections.abc import Iterable

AUTHORIZATION = "authorization"


class CredentialGivenTwice(ValueError):
    """More than one `authorization` entry: a proxy in front may read another one than this server does
    (HTTP refuses two Authorization headers for the same reason)."""

    def __init__(self, count: int) -> None:
        super().__init__(f"given {count} times; send exactly one 'authorization: Bearer <key>'")


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The token of the call's one `authorization: Bearer <token>` entry (the scheme case-insensitive); ""
    when there is none or it is not Bearer. Raises CredentialGivenTwice for two entries or more."""
    values = [value for key, value in metadata or () if key.lower() == AUTHORIZATION]
    if len(values) > 1:
        raise CredentialGivenTwice(len(values))
    if not values:
        return ""
    value = values[0].decode("utf-8", "replace") if isinstance(values[0], bytes) else values[0]
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""
