import asyncio

import grpc
import pytest

from benchmarks.load import INCOMPLETE_STREAM, RequestRecord, percentiles, replay, replay_http, summarize
from benchmarks.trace import TraceRequest
from openlora.v1 import inference_pb2, inference_pb2_grpc


def _record(index, *, ttft, e2e, tokens, itl=(), tier="device", error=None, adapter="a"):
    return RequestRecord(
        index=index,
        adapter=adapter,
        scheduled_s=0.0,
        max_tokens=tokens,
        ttft_ms=ttft,
        e2e_ms=e2e,
        itl_ms=list(itl),
        completion_tokens=tokens if error is None else 0,
        cache_tier=tier,
        error=error,
    )


def test_percentiles_interpolate_between_closest_ranks():
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentiles(values) == pytest.approx({"p50": 50.5, "p90": 90.1, "p99": 99.01})
    assert percentiles([7.0]) == {"p50": 7.0, "p90": 7.0, "p99": 7.0}
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None}


def test_summary_counts_tokens_of_successful_requests_over_the_window():
    records = [
        _record(0, ttft=10, e2e=100, tokens=20, itl=[5, 5]),
        _record(1, ttft=30, e2e=300, tokens=30, itl=[15], tier="disk", adapter="b"),
        _record(2, ttft=None, e2e=None, tokens=40, error="RESOURCE_EXHAUSTED", adapter="c"),
    ]
    summary = summarize(records, started_s=100.0, finished_s=102.0)
    assert summary["completed"] == 2
    assert summary["errors"] == 1
    assert summary["errors_by_code"] == {"RESOURCE_EXHAUSTED": 1}
    assert summary["completion_tokens"] == 50
    assert summary["requested_tokens"] == 90
    assert summary["tokens_per_s"] == pytest.approx(25.0)
    assert summary["requests_per_s"] == pytest.approx(1.0)
    assert summary["ttft_ms"]["p50"] == pytest.approx(20.0)
    assert summary["itl_ms"]["p50"] == pytest.approx(5.0)
    assert summary["e2e_ms"]["p99"] == pytest.approx(298.0)
    assert summary["by_cache_tier"]["device"] == {
        "requests": 1,
        "ttft_ms": {"p50": 10.0, "p90": 10.0, "p99": 10.0},
    }
    assert summary["by_cache_tier"]["disk"]["requests"] == 1
    assert summary["distinct_adapters"] == 3


class _HoldFirstUntilSecond(inference_pb2_grpc.InferenceServiceServicer):
    """Streams max_tokens tokens, one per message; holds request 0 until request 1 has arrived."""

    def __init__(self):
        self.second_arrived = asyncio.Event()
        self.seen = []

    async def Generate(self, request, context):
        self.seen.append((request.request_id, dict(context.invocation_metadata())))
        if request.adapter == "missing":
            await context.abort(grpc.StatusCode.NOT_FOUND, "adapter not found")
        if request.request_id.endswith("-1"):
            self.second_arrived.set()
        else:
            await asyncio.wait_for(self.second_arrived.wait(), timeout=10)
        n = request.sampling.max_tokens
        for i in range(n):
            message = inference_pb2.GenerateResponse(request_id=request.request_id, token_ids=[100 + i])
            if i == n - 1:
                message.finish_reason = inference_pb2.FINISH_REASON_LENGTH
                message.usage.prompt_tokens = len(request.prompt_token_ids)
                message.usage.completion_tokens = n
                message.timing.cache_tier = inference_pb2.CACHE_TIER_HOST
                message.timing.ttft_ms = 1.5
            yield message


def test_replay_is_open_loop_and_records_tokens_tiers_and_errors():
    async def scenario():
        servicer = _HoldFirstUntilSecond()
        server = grpc.aio.server()
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            requests = [
                TraceRequest(0, 0.0, "a", (20, 21, 22), 4),
                TraceRequest(1, 0.05, "b", (23, 24), 3),
                TraceRequest(2, 0.0, "missing", (25,), 2),
            ]
            records, t0, finished = await asyncio.wait_for(
                replay(requests, f"127.0.0.1:{port}", "secret", run_tag="run"), timeout=20
            )
        finally:
            await server.stop(None)
        return servicer, records, t0, finished

    servicer, records, t0, finished = asyncio.run(scenario())
    assert {rid for rid, _ in servicer.seen} == {"run-0", "run-1", "run-2"}
    assert all(md["authorization"] == "Bearer secret" for _, md in servicer.seen)
    first, second, missing = records
    assert (first.completion_tokens, first.prompt_tokens, first.cache_tier) == (4, 3, "host")
    assert first.finish_reason == "FINISH_REASON_LENGTH"
    assert len(first.itl_ms) == 3
    assert first.server_ttft_ms == 1.5
    assert second.completion_tokens == 3 and second.error is None
    assert missing.error == "NOT_FOUND" and missing.completion_tokens == 0
    # request 0 is held by the server until request 1 arrives: a closed-loop client would never finish it
    assert first.e2e_ms is not None and first.error is None
    summary = summarize(records, t0, finished)
    assert summary["completion_tokens"] == 7 and summary["errors_by_code"] == {"NOT_FOUND": 1}


def _sse_chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def test_an_http_stream_cut_between_two_chunks_is_a_failed_request_not_a_short_success():
    """A worker that goes away mid-stream closes the connection between two chunks; the chunked reader then
    sees the end of its input, which must not read as a finished stream (over gRPC the same cut fails)."""

    async def answer(reader, writer, cut: bool):
        while (await reader.readline()) not in (b"\r\n", b""):
            pass  # the request's head; its body is left unread
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        token = b'data: {"choices": [{"text": "w", "finish_reason": null}]}\n\n'
        writer.write(_sse_chunk(token) + _sse_chunk(token))
        if not cut:
            usage = b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}\n\n'
            writer.write(_sse_chunk(usage) + _sse_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def scenario(cut: bool):
        server = await asyncio.start_server(lambda r, w: answer(r, w, cut), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            return await asyncio.wait_for(
                replay_http(
                    [TraceRequest(0, 0.0, "a", (20, 21, 22), 8)], f"http://127.0.0.1:{port}/v1", "k", "b"
                ),
                timeout=20,
            )
        finally:
            server.close()
            await server.wait_closed()

    (whole,), t0, finished = asyncio.run(scenario(cut=False))
    assert whole.error is None and whole.completion_tokens == 2 and whole.e2e_ms is not None
    (cut,), t0, finished = asyncio.run(scenario(cut=True))
    assert cut.error == INCOMPLETE_STREAM and "[DONE]" in cut.error_detail
    summary = summarize([cut], t0, finished)
    assert (summary["completed"], summary["errors"], summary["completion_tokens"]) == (0, 1, 0)
