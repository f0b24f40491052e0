"""Reading the Bearer credential from call metadata."""

from __future__ import annotations

import grpc


def bearer_token(context: grpc.aio.ServicerContext) -> str:
    """The token of `authorization: Bearer <token>`, or "" when absent or malformed."""
    for key, value in context.invocation_metadata() or ():
        if key.lower() == "authorization":
            scheme, _, token = (value.decode() if isinstance(value, bytes) else value).partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return ""
