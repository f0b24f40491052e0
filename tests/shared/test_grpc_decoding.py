"""A request whose bytes do not decode (a string field that is not UTF-8, truncated wire data) is
INVALID_ARGUMENT naming the request with RequestDecodingInterceptor; grpc alone answers UNKNOWN.

A real grpc.aio server on loopback serves the project's generated service handlers with small
servicers, because the point is what happens before any servicer runs."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import grpc
import pytest

from openlora.grpc_decoding import RequestDecodingInterceptor
from openlora.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc

NOT_UTF8_PROMPT = b"\x1a\x02\xff\xfe"  # GenerateRequest field 3 (prompt): two bytes that are not UTF-8
NOT_UTF8_PAGE_TOKEN = b"\x1a\x02\xff\xfe"  # ListAdaptersRequest field 3 (page_token)
TRUNCATED = b"\x1a\x10ab"  # a length of 16 with two bytes left
UPLOAD_NOT_UTF8 = b"\x0a\x04\x0a\x02\xff\xfe"  # UploadAdapterRequest.header.name (1.1) not UTF-8


class Inference(inference_pb2_grpc.InferenceServiceServicer):
    async def Generate(self, request, context):
        yield inference_pb2.GenerateResponse(text=request.prompt)


class Admin(admin_pb2_grpc.AdminServiceServicer):
    async def ListAdapters(self, request, context):
        return admin_pb2.ListAdaptersResponse(next_page_token=request.page_token)

    async def UploadAdapter(self, request_iterator, context):
        async for _ in request_iterator:
            pass
        return admin_pb2.UploadAdapterResponse()


class Server:
    def __init__(self, interceptors: list) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.server, self.port = self._run(self._start(interceptors))
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)

    async def _start(self, interceptors: list):
        server = grpc.aio.server(interceptors=interceptors)
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(Inference(), server)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(Admin(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    def status(self, method: str, raw: bytes, kind: str = "unary_unary") -> tuple[grpc.StatusCode, str]:
        call = getattr(self.channel, kind)(method, request_serializer=lambda b: b)
        try:
            if kind == "unary_stream":
                list(call(raw, timeout=10))
            elif kind == "stream_unary":
                call(iter([raw]), timeout=10)
            else:
                call(raw, timeout=10)
        except grpc.RpcError as error:
            return error.code(), error.details() or ""
        return grpc.StatusCode.OK, ""

    def close(self) -> None:
        self.channel.close()
        self._run(self.server.stop(None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module", params=["alone", "before the control plane's error mapping"])
def guarded(request) -> Iterator[Server]:
    from control_plane.server.interceptor import ErrorMappingInterceptor

    others = [ErrorMappingInterceptor()] if request.param != "alone" else []
    server = Server([RequestDecodingInterceptor(), *others])
    yield server
    server.close()


CASES = {
    "generate prompt not utf-8": ("/openlora.v1.InferenceService/Generate", NOT_UTF8_PROMPT, "unary_stream"),
    "generate truncated": ("/openlora.v1.InferenceService/Generate", TRUNCATED, "unary_stream"),
    "list page_token not utf-8": (
        "/openlora.v1.AdminService/ListAdapters",
        NOT_UTF8_PAGE_TOKEN,
        "unary_unary",
    ),
    "upload header name not utf-8": (
        "/openlora.v1.AdminService/UploadAdapter",
        UPLOAD_NOT_UTF8,
        "stream_unary",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_undecodable_request_is_invalid_argument_naming_the_request(guarded, case):
    method, raw, kind = CASES[case]
    code, details = guarded.status(method, raw, kind)
    assert (code, details.startswith("request: not a valid")) == (grpc.StatusCode.INVALID_ARGUMENT, True), (
        details
    )


def test_decodable_requests_still_reach_the_servicer(guarded):
    good = inference_pb2.GenerateRequest(prompt="hi").SerializeToString()
    assert (
        guarded.status("/openlora.v1.InferenceService/Generate", good, "unary_stream")[0]
        == grpc.StatusCode.OK
    )
    token = admin_pb2.ListAdaptersRequest(page_token="abc").SerializeToString()
    assert guarded.status("/openlora.v1.AdminService/ListAdapters", token)[0] == grpc.StatusCode.OK
    upload = admin_pb2.UploadAdapterRequest(
        header=admin_pb2.UploadAdapterHeader(name="n")
    ).SerializeToString()
    assert (
        guarded.status("/openlora.v1.AdminService/UploadAdapter", upload, "stream_unary")[0]
        == grpc.StatusCode.OK
    )


def test_without_the_interceptor_grpc_answers_something_other_than_invalid_argument():
    server = Server([])
    try:
        code, _ = server.status("/openlora.v1.InferenceService/Generate", NOT_UTF8_PROMPT, "unary_stream")
    finally:
        server.close()
    assert code != grpc.StatusCode.INVALID_ARGUMENT
