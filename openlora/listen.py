"""Binding a listener, with one clear error when the address cannot be taken (gRPC raises a bare
RuntimeError "Failed to bind", and a metrics port in use an OSError, which reached the operator as a
traceback)."""

from __future__ import annotations

import re

from openlora.text_rules import quoted

_PORT = re.compile(r"[0-9]{1,5}")
_IN_USE = "the port is in use or the address is not this machine's"
_FAILED_ADDRESS = re.compile(r"cannot listen on (\S+?): ")


def address_problem(address: str) -> str | None:
    """Why `address` is not HOST:PORT with a port in 0..65535, or None. gRPC takes a port past 65535 (or
    a negative one) modulo 65536: `127.0.0.1:99999` listened on 34463, where no client was told to look."""
    host, _, port = address.rpartition(":")
    if not host or not _PORT.fullmatch(port) or int(port) > 65535:
        return f"must be HOST:PORT with a port in 0..65535, got {quoted(address)}"
    return None


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
