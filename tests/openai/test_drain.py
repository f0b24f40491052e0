"""A draining worker finishes its HTTP streams and refuses new HTTP calls, as it does for gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import httpx

from tests.openai.conftest import EnginePause, start_http_worker

BODY = {"model": "ad5", "prompt": "hello world", "max_tokens": 30, "stream": True}


@contextlib.contextmanager
def _worker_with_a_stream(system, tmp_path, tenant):
    """An HTTP worker, a client and a stream of BODY whose first event arrived: (http, pause, client,
    the stream's data lines, its first). The worker is stopped and the engine released afterwards."""
    http = start_http_worker(system, tmp_path)
    pause = EnginePause(http.worker)
    headers = {"Authorization": f"Bearer {tenant[2]}"}
    try:
        with (
            httpx.Client(base_url=http.base_url, headers=headers, timeout=60) as client,
            client.stream("POST", "/completions", json=BODY) as stream,
        ):
            lines = (line for line in stream.iter_lines() if line.startswith("data: "))
            yield http, pause, client, lines, next(lines)
    finally:
        pause.restore()
        system.loop.run(http.worker.stop(1.0))


def test_drain_finishes_the_http_stream_in_flight_and_refuses_new_calls_with_503(system, tmp_path, tenant):
    with _worker_with_a_stream(system, tmp_path, tenant) as (http, pause, client, lines, first):
        pause.pause()
        stopping = asyncio.run_coroutine_threadsafe(http.worker.stop(30.0), system.loop.loop)
        deadline = time.monotonic() + 20
        while not http.worker.state.draining:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        refused = client.post("/completions", json={**BODY, "stream": False})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "draining" in refused.json()["error"]["message"]
        pause.resume()
        rest = [first, *lines]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][len("data: ") :])["choices"][0]["finish_reason"] == "length"
        stopping.result(30)
        assert http.worker.state.in_flight == 0


def test_a_stream_still_running_when_the_grace_ends_gets_an_error_event_and_done(system, tmp_path, tenant):
    """The grace ends before the stream: it still ends as an SSE stream should, its last events an error
    object saying the worker is draining, then [DONE] (the connection was cut with neither before)."""
    with _worker_with_a_stream(system, tmp_path, tenant) as (http, pause, _, lines, first):
        pause.pause()  # the stream cannot finish within the grace
        stopping = asyncio.run_coroutine_threadsafe(http.worker.stop(0.5), system.loop.loop)
        rest = [first, *lines]
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2][len("data: ") :])["error"]
        assert "draining" in error["message"]
        pause.resume()
        stopping.result(30)
        assert http.worker.state.in_flight == 0
