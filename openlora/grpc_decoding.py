"""Requests whose bytes do not decode, refused as INVALID_ARGUMENT.

When a request deserializer raises (bytes that are not the message, a string field that is not UTF-8),
grpc answers UNKNOWN or INTERNAL before any servicer runs. `RequestDecodingInterceptor` wraps every
deserializer so that such a request becomes a marker, and every handler so that a marker is refused
with `request: not a valid <Message> (...)` before the servicer sees it. Used by both servers.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

# Health and reflection keep grpc's own handling; only this project's services are wrapped.
_OWN_SERVICES = "/openlora.v1."


class _Undecodable:
    """Stands in for a request that did not decode; `reason` is the decoder's message."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _message_name(deserializer: Callable) -> str:
    owner = getattr(deserializer, "__self__", None)
    return getattr(owner, "__name__", "message")


def _safe_deserializer(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    name = _message_name(deserializer)

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as e:  # any decoder failure on bytes from outside is the caller's input
            return _Undecodable(f"not a valid {name} ({str(e)[:200]})")

    return decode


async def _refuse(context: grpc.aio.ServicerContext, request: _Undecodable) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: {request.reason}")


async def _checked(requests: AsyncIterator, context: grpc.aio.ServicerContext) -> AsyncIterator:
    async for request in requests:
        if isinstance(request, _Undecodable):
            await _refuse(context, request)
        yield request


def _unary_request(behavior: Callable) -> Callable:
    if inspect.isasyncgenfunction(behavior):

        async def stream(request, context):
            if isinstance(request, _Undecodable):
                await _refuse(context, request)
            async for response in behavior(request, context):
                yield response

        return stream

    async def call(request, context):
        if isinstance(request, _Undecodable):
            await _refuse(context, request)
        return await behavior(request, context)

    return call


def _stream_request(behavior: Callable) -> Callable:
    if inspect.isasyncgenfunction(behavior):

        async def stream(requests, context):
            async for response in behavior(_checked(requests, context), context):
                yield response

        return stream

    async def call(requests, context):
        return await behavior(_checked(requests, context), context)

    return call


class RequestDecodingInterceptor(grpc.aio.ServerInterceptor):
    """Put first in a grpc.aio server's interceptors: undecodable requests -> INVALID_ARGUMENT."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(_OWN_SERVICES):
            return handler
        behavior = (
            handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
        )
        if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
            return handler  # a synchronous handler runs in grpc's thread pool: left as it is
        kwargs = {
            "request_deserializer": _safe_deserializer(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(_unary_request(handler.unary_unary), **kwargs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(_unary_request(handler.unary_stream), **kwargs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(_stream_request(handler.stream_unary), **kwargs)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(_stream_request(handler.stream_stream), **kwargs)
        return handler
