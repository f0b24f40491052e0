"""The ASGI response of one completion: runs the generate path while watching for the client leaving.

Errors before the first chunk are whole error responses with their status; once a stream has started
(status 200 sent), an error is one SSE event holding the error object, then `[DONE]`. A client that
disconnects cancels the generation at once (the engine request is aborted, what was sent is billed),
streamed or not. Chunks are pulled until the generator ends, so the last one is counted as delivered.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable

import anyio

from data_plane.server.generation import Chunk
from data_plane.server.openai_http import sse
from data_plane.server.openai_http.errors import http_error
from data_plane.server.openai_http.openai_objects import Reply
from openlora.text_rules import MAX_REQUEST_ID_CHARS, identifier_problem

log = logging.getLogger(__name__)


class GenerationResponse:
    def __init__(
        self,
        open_chunks: Callable[[], AsyncIterator[Chunk]],
        reply: Reply,
        stream: bool,
        include_usage: bool,
        logprobs: bool,
        spell_token: Callable[[int], tuple[str, bytes]],
        on_done: Callable[[str], None],
        request_id: str = "",
    ) -> None:
        self._open_chunks = open_chunks
        self._reply = reply
        self._stream = stream
        self._include_usage = include_usage
        self._logprobs = logprobs
        self._spell_token = spell_token  # a token id -> (its text, its own bytes), for logprobs
        self._on_done = on_done  # called once with the gRPC status name of the outcome
        self._request_id = request_id
        self._disconnected = False

    async def __call__(self, scope, receive, send) -> None:
        code = "CANCELLED"
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self._watch, receive, group.cancel_scope)
                code = await self._respond(send)
                group.cancel_scope.cancel()
        finally:
            if self._disconnected:
                code = "CANCELLED"
            self._on_done(code)

    async def _watch(self, receive, scope: anyio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self._disconnected = True
        scope.cancel()

    async def _respond(self, send) -> str:
        chunks = self._open_chunks()
        try:
            try:
                first = await anext(chunks)
            except StopAsyncIteration:
                first = None
            except Exception as error:
                return await self._send_error(send, error)
            if self._stream:
                return await self._send_stream(send, first, chunks)
            return await self._send_whole(send, first, chunks)
        finally:
            with anyio.CancelScope(shield=True):  # its finally bills what was delivered
                await chunks.aclose()

    async def _send_error(self, send, error: BaseException) -> str:
        failure = http_error(error, self._reply.chat)
        if failure.status >= 500 and failure.code == "internal":
            log.error("completion failed", exc_info=error)
        headers = {**failure.headers(), **self._id_header(self._request_id)}
        await _send_json(send, failure.status, failure.payload(), headers)
        return failure.code.upper()

    async def _send_whole(self, send, first: Chunk | None, chunks: AsyncIterator[Chunk]) -> str:
        reply = self._reply
        try:
            if first is not None:
                reply.add(first)
            async for chunk in chunks:
                reply.add(chunk)
        except Exception as error:
            return await self._send_error(send, error)
        body = reply.whole(self._logprobs, self._spell_token)
        await _send_json(send, 200, body, self._id_header(reply.request_id))
        return "OK"

    async def _send_stream(self, send, first: Chunk | None, chunks: AsyncIterator[Chunk]) -> str:
        reply = self._reply
        if first is not None:
            reply.request_id = first.request_id
        headers = [
            (b"content-type", sse.MEDIA_TYPE.encode()),
            (b"cache-control", b"no-cache"),
            *((k.lower().encode(), v.encode()) for k, v in self._id_header(reply.request_id).items()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        code = "OK"
        chunk, index = first, 0
        try:
            while chunk is not None:
                if chunk.finish is not None:  # a stream keeps no text: only what its usage chunk needs
                    reply.finish = chunk.finish
                event = reply.chunk(chunk, index == 0, self._logprobs, self._include_usage, self._spell_token)
                await send({"type": "http.response.body", "body": sse.event(event), "more_body": True})
                index += 1
                chunk = await anext(chunks, None)
            if self._include_usage:
                await _send_body(send, sse.event(reply.usage_chunk()))
        except Exception as error:  # after the 200: the error is the stream's last event
            failure = http_error(error, self._reply.chat)
            code = failure.code.upper()
            await _send_body(send, sse.event(failure.payload()))
        await send({"type": "http.response.body", "body": sse.DONE, "more_body": False})
        return code

    @staticmethod
    def _id_header(request_id: str) -> dict[str, str]:
        """The id echoed, unless it was refused for what it holds (a refusal of X-Request-Id for being in
        use echoes it; one for its control characters must not write them into a header)."""
        if not request_id or identifier_problem(request_id, MAX_REQUEST_ID_CHARS) is not None:
            return {}
        return {"X-Request-Id": request_id}


async def _send_json(send, status: int, payload: dict, headers: dict[str, str]) -> None:
    body = json.dumps(payload, ensure_ascii=False).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _send_body(send, data: bytes) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": True})
