"""The OpenAI-compatible API's HTTP server: uvicorn serving the Starlette app as a task of the worker's
event loop, beside the gRPC server (no thread, no second loop, no gRPC hop inside the worker)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import uvicorn

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        # The worker handles SIGTERM/SIGINT itself (drain first); uvicorn must neither take nor re-raise them.
        yield


class HttpServer:
    """`start()` binds and serves; `stop()` closes the listener and waits for open responses."""

    def __init__(self, app, listen: str, shutdown_timeout_s: float = 5.0) -> None:
        host, _, port = listen.rpartition(":")
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
