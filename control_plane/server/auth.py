"""Reading the Bearer credential from call metadata."""

from __future__ import annotations

import grpc

from control_plane.errors import InvalidArgument
from openlora import bearer


def bearer_token(context: grpc.aio.ServicerContext) -> str:
    """The token of `authorization: Bearer <token>`, or "" when absent or malformed; INVALID_ARGUMENT
    naming `authorization` when the call carries it more than once."""
    try:
        return bearer.bearer_token(context.invocation_metadata())
    except bearer.CredentialGivenTwice as error:
        raise InvalidArgument(str(error), field=bearer.AUTHORIZATION) from None
