"""Binding a gRPC server's listener, with one clear error when the address cannot be taken (gRPC raises
a bare RuntimeError "Failed to bind", which reached the operator as a traceback)."""

from __future__ import annotations


class ListenError(OSError):
    """The listener's address is in use, or is not an address of this machine."""


def bind(server, listen: str, flag: str) -> int:
    """Adds an insecure port for `listen` to a grpc.aio server; returns the port bound. Raises
    ListenError naming the address and the `flag` (with its environment variable) that moves it."""
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError:
        port = 0
    if port == 0:
        raise ListenError(
            f"cannot listen on {listen}: the port is in use or the address is not this machine's; "
            f"free it or choose another with {flag}"
        )
    return port
