"""The load generator's HTTP path, replaying a trace against a worker's OpenAI-compatible API."""

from __future__ import annotations

import asyncio

from benchmarks.load import replay, replay_http, summarize
from benchmarks.trace import TraceRequest


def test_http_replay_records_the_same_tokens_as_grpc_and_the_errors(http_worker, tenant):
    requests = [
        TraceRequest(0, 0.0, "ad0", (20, 21, 22), 5),
        TraceRequest(1, 0.02, "", (23, 24), 4),
        TraceRequest(2, 0.0, "no-such-adapter", (25,), 2),
    ]
    records, t0, finished = asyncio.run(
        replay_http(requests, http_worker.base_url, tenant[2], "tiny", run_tag="http-replay")
    )
    first, base, missing = records
    assert (first.completion_tokens, first.prompt_tokens, first.finish_reason) == (5, 3, "length")
    assert first.ttft_ms is not None and first.e2e_ms >= first.ttft_ms
    # One sample per gap between SSE chunks; a chunk holds several tokens when the stream lagged.
    assert 1 <= len(first.itl_ms) <= first.completion_tokens - 1
    assert (base.completion_tokens, base.error) == (4, None)
    assert missing.error == "HTTP_404" and missing.completion_tokens == 0
    assert summarize(records, t0, finished)["errors_by_code"] == {"HTTP_404": 1}

    grpc_records, _, _ = asyncio.run(
        replay(requests[:2], http_worker.grpc_target, tenant[2], run_tag="grpc-replay")
    )
    assert [r.completion_tokens for r in grpc_records] == [5, 4]
