"""The OpenAI-compatible API's HTTP server: uvicorn serving the Starlette app as a task of the worker's
event loop, beside the gRPC server (no thread, no second loop, no gRPC hop inside the worker)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import socket
import sys

import grpc
import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from data_plane.server.openai_http.errors import HttpError

log = logging.getLogger(__name__)

# A connection must send a whole request's headers within this long (uvicorn waits forever: 1,500 silent
# connections held 1,500 descriptors, without a key); past it the connection is closed.
HEADER_TIMEOUT_S = 10.0
# A request line and headers larger than this are answered 431 (h11's own default, made explicit).
MAX_HEADER_BYTES = 16 * 1024
# How long a connection answered 400/431 for bytes that are not a request reads and drops what follows.
LINGER_S = 2.0
# Open connections at most: past it a connection's request is answered 503 and the connection closed.
MAX_CONNECTIONS = 4096
# Connections past MAX_CONNECTIONS that are still answered (503, Retry-After) rather than closed unread,
# each given OVER_CAPACITY_HEADER_TIMEOUT_S to send its request. Any past these is closed as it arrives:
# held for HEADER_TIMEOUT_S each, connections past the cap had no bound at all, and a client with no key
# that opened them faster than they expired took every descriptor of the worker (the gRPC listener
# stopped accepting, asyncio logged a traceback for each refused accept: 50 MB of log in 30 s).
OVERFLOW_CONNECTIONS = 64
OVER_CAPACITY_HEADER_TIMEOUT_S = 1.0
# Bytes of pipelined requests (sent before the answer to the request in progress) held for after that
# answer. Past them the connection is closed once the answer is sent, and what else arrives is dropped.
MAX_PIPELINED_BYTES = 64 * 1024
# Chunks a request body may be sent in (Transfer-Encoding: chunked). h11 parses each chunk's framing in
# Python on the event loop the gRPC server shares, about 6 us a chunk: a body sent in 1-byte chunks cost
# the loop a second per megabyte on the wire, and two such uploads held another tenant's one-line
# completion for 16 s. A 4 MiB body in this many chunks averages 1 KiB a chunk.
MAX_BODY_CHUNKS = 4096


class _TooManyChunks(h11.RemoteProtocolError):
    pass


class _ChunkCountingConnection(h11.Connection):
    """h11's server side, refusing a request body sent in more than MAX_BODY_CHUNKS chunks."""

    def __init__(self, max_incomplete_event_size: int) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size)
        self._num_body_chunks = 0

    def next_event(self):
        event = super().next_event()
        if isinstance(event, h11.Request):
            self._num_body_chunks = 0
            event = _origin_form(event)
        elif isinstance(event, h11.Data) and event.chunk_start:
            self._num_body_chunks += 1
            if self._num_body_chunks > MAX_BODY_CHUNKS:
                raise _TooManyChunks(
                    f"the body is sent in more than {MAX_BODY_CHUNKS} chunks: send it in larger chunks, "
                    "or with Content-Length",
                    error_status_hint=400,
                )
        return event


def _origin_form(request: h11.Request) -> h11.Request:
    """The request with an absolute-form target (`GET http://host:8000/v1/models`, as a client configured
    with a proxy URL sends it) as its path and query: every HTTP/1.1 server must accept that form (RFC 9112,
    3.2.2), and uvicorn routed the whole URL as a path (404). Other targets are left as they are."""
    target = request.target
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        return request
    cut = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
    path = rest[cut:]
    path = b"/" + path if not path.startswith(b"/") else path
    return h11.Request(
        method=request.method, target=path, headers=request.headers, http_version=request.http_version
    )


class _LingeringTransport:
    """A request's view of its connection's transport: closed by the answer (`Connection: close`) while
    the request's body is left unread (a refusal before it: 401, 413 for its declared length, ...), it
    closes lingering (`_HeaderTimeoutProtocol.linger`), not at once: a client sending the body anyway,
    one that sent `Expect: 100-continue` without waiting included, got a reset that destroyed the answer
    before it was read."""

    def __init__(self, protocol: _HeaderTimeoutProtocol) -> None:
        self._protocol = protocol
        self._transport = protocol.transport

    def __getattr__(self, name: str):
        return getattr(self._transport, name)

    def close(self) -> None:
        if self._protocol.conn.their_state is h11.SEND_BODY and not self._transport.is_closing():
            self._protocol.linger()
        else:
            self._transport.close()


class _HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for every request's headers: the first one's from the
    connection's start, each later one's on a kept-alive connection from the end of the response before
    it. (uvicorn's keep-alive timeout is cancelled by any byte received, so a client that sent a partial
    request line after each response held its connection for ever: enough of them, no key needed, filled
    the connection cap for everyone.)"""

    max_connections = MAX_CONNECTIONS  # HttpServer sets its own cap on a subclass

    def __init__(self, config, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        self.conn = _ChunkCountingConnection(MAX_HEADER_BYTES)

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timeout_s = HEADER_TIMEOUT_S
        open_now = len(self.connections)  # this one counted
        if open_now > self.max_connections + OVERFLOW_CONNECTIONS:
            self._header_timer = None
            transport.close()  # no descriptor is held for it: past the overflow nothing is answered
            return
        if open_now > self.max_connections:  # every request on it is refused, and it must come at once
            self.app = functools.partial(_over_capacity, self.max_connections)
            self._header_timeout_s = OVER_CAPACITY_HEADER_TIMEOUT_S
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        self._cycle_before = self.cycle  # a request's headers have arrived once the cycle is another
        self._header_timer = self.loop.call_later(self._header_timeout_s, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not self._cycle_before:
            self._cancel_header_timer()
            if self.cycle is not None and not isinstance(self.cycle.transport, _LingeringTransport):
                self.cycle.transport = _LingeringTransport(self)

    def on_response_complete(self) -> None:
        self._cancel_header_timer()
        if not self.transport.is_closing() and not getattr(self, "_refused", False):
            self._arm_header_timer()  # before uvicorn handles a pipelined request, which cancels it
        super().on_response_complete()

    def connection_lost(self, exc) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """What uvicorn sends for bytes h11 cannot take as a request (plain text 400 for every cause), and
        for a body in more than MAX_BODY_CHUNKS chunks: OpenAI's error object with h11's own status, 431
        for headers past its size limit, 400 for the rest. Called from uvicorn's `except
        h11.RemoteProtocolError` block, whose error `sys.exc_info` still holds."""
        error = sys.exc_info()[1]
        status = getattr(error, "error_status_hint", 400)
        if status == 431:
            message = f"the request line and headers are larger than {MAX_HEADER_BYTES} bytes"
        elif isinstance(error, _TooManyChunks):
            message = str(error)
        else:
            status, message = 400, f"the request is not valid HTTP/1.1 ({error or msg})"
        payload = HttpError(status, message, None, grpc.StatusCode.INVALID_ARGUMENT.name.lower()).payload()
        body = json.dumps(payload).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        try:
            for event in (
                h11.Response(status_code=status, headers=headers),
                h11.Data(data=body),
                h11.EndOfMessage(),
            ):
                self.transport.write(self.conn.send(event) or b"")
        except h11.LocalProtocolError:  # h11 cannot answer on this connection any more: close it silently
            self.transport.close()
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # Refused while the app reads the body (too many chunks): it sees the client leave, and ends.
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.linger()

    def linger(self) -> None:
        """A lingering close: the client may still be sending what was refused, and closing with its bytes
        unread resets the connection, which can destroy the answer before the client reads it. What
        arrives is dropped until the client closes or LINGER_S passes."""
        self._refused = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)

    def data_received(self, data: bytes) -> None:
        if getattr(self, "_refused", False):
            return  # the rest of a refused request: read and dropped until the client or LINGER_S closes
        if self._answering_whole_request():
            self._hold_pipelined(data)
            return
        super().data_received(data)

    def _answering_whole_request(self) -> bool:
        """Whether the request in progress has arrived whole and is not answered yet: what arrives now
        is a pipelined request, for after the answer."""
        return (
            self.cycle is not None
            and not self.cycle.response_complete
            and self.conn.their_state in (h11.DONE, h11.MIGHT_SWITCH_PROTOCOL)
        )

    def _hold_pipelined(self, data: bytes) -> None:
        """Keeps a pipelined request's bytes in h11's buffer (handled once the answer before it is sent)
        without stopping reading: uvicorn stopped reading the connection at the first pipelined byte, so
        a client that then left was not seen to leave, and its completion ran on to its end (a
        non-streamed one billed whole, though nothing was delivered). Past MAX_PIPELINED_BYTES the
        connection closes after the answer and the rest is dropped; reading goes on regardless."""
        if not self.cycle.keep_alive:
            return
        if len(self.conn.trailing_data[0]) + len(data) > MAX_PIPELINED_BYTES:
            self.cycle.keep_alive = False
            return
        self.conn.receive_data(data)

    def _headers_too_slow(self) -> None:
        if self.cycle is self._cycle_before and not self.transport.is_closing():
            log.info("HTTP connection closed: no request headers within %g s", self._header_timeout_s)
            self.transport.close()


async def _over_capacity(max_connections: int, scope, receive, send) -> None:
    """The answer on a connection past MAX_CONNECTIONS: OpenAI's error object, 503 with Retry-After (so
    the official clients back off and retry), and the connection closed (uvicorn's own was plain text)."""
    error = HttpError(
        503,
        f"the worker holds {max_connections} HTTP connections, the most it takes; retry shortly",
        None,
        grpc.StatusCode.UNAVAILABLE.name.lower(),
    )
    await error.response({"Connection": "close"})(scope, receive, send)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        # The worker handles SIGTERM/SIGINT itself (drain first); uvicorn must neither take nor re-raise them.
        yield


class HttpServer:
    """`start()` binds and serves; `stop()` closes the listener and waits for open responses."""

    def __init__(
        self, app, listen: str, shutdown_timeout_s: float = 5.0, max_connections: int | None = None
    ) -> None:
        host, _, port = listen.rpartition(":")
        self._max_connections = max_connections  # None: MAX_CONNECTIONS when it starts
        self.host = host.strip("[]") or "0.0.0.0"
        self._port = int(port)
        self._app = app
        self._shutdown_timeout_s = shutdown_timeout_s
        self._server: _Server | None = None
        self._task: asyncio.Task | None = None
        self.port = 0

    async def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self._port))  # a bind error is the caller's OSError, not uvicorn's exit
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._app,
            lifespan="off",
            access_log=False,
            log_config=None,  # the worker's logging, not uvicorn's dictConfig
            log_level="warning",
            timeout_graceful_shutdown=self._shutdown_timeout_s,
            http=type(
                "_CappedProtocol",
                (_HeaderTimeoutProtocol,),
                {"max_connections": self._max_connections or MAX_CONNECTIONS},
            ),
            h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        )
        self._server = _Server(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises its error
                raise OSError(f"the HTTP server on {self.host}:{self.port} stopped at start")
            await asyncio.sleep(0.01)
        log.info("OpenAI-compatible API on http://%s:%d/v1", self.host, self.port)

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            await self._task
