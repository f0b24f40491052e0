"""Binding a listener, with one clear error when the address cannot be taken (gRPC raises a bare
RuntimeError "Failed to bind", and a metrics port in use an OSError, which reached the operator as a
traceback)."""

from __future__ import annotations

import re

_IN_USE = "the port is in use or the address is not this machine's"
_FAILED_ADDRESS = re.compile(r"cannot listen on (\S+?): ")


class ListenError(OSError):
    """The listener's address is in use, or is not an address of this machine."""


def listen_error(listen: str, flag: str, reason: str = _IN_USE) -> ListenError:
    """The ListenError for `listen` (HOST:PORT): one line naming the address and the `flag` (with its
    environment variable) that moves it."""
    return ListenError(f"cannot listen on {listen}: {reason}; free it or choose another with {flag}")


def failed_address(text: str) -> str | None:
    """The address of the last ListenError message in `text` (a process's output), or None."""
    found = _FAILED_ADDRESS.findall(text)
    return found[-1] if found else None


def bind(server, listen: str, flag: str) -> int:
    """Adds an insecure port for `listen` to a grpc.aio server; returns the port bound. Raises
    ListenError naming the address and the `flag` (with its environment variable) that moves it."""
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError:
        port = 0
    if port == 0:
        raise listen_error(listen, flag)
    return port
