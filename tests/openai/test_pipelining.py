"""HTTP/1.1 pipelining: requests sent on a connection before the answer to the one before them are served
in order, and never stop the server from seeing the client leave while a completion runs."""

from __future__ import annotations

import json
import re
import socket
import time
import uuid

import pytest

from data_plane.server.openai_http import server

from .conftest import EnginePause, start_http_worker

PROMPT = "the quick brown fox"


def _post(key: str, body: dict, request_id: str = "") -> bytes:
    data = json.dumps(body).encode()
    id_header = f"X-Request-Id: {request_id}\r\n" if request_id else ""
    return (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {key}\r\n{id_header}Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )


def _models(key: str) -> bytes:
    return f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n".encode()


def _held_bytes(http) -> int:
    """Bytes the worker's HTTP connections hold received but not yet handled (pipelined requests)."""
    connections = http.worker.http._server.server_state.connections
    return sum(len(protocol.conn.trailing_data[0]) for protocol in list(connections))


def _read_until_closed(sock: socket.socket) -> bytes:
    raw = b""
    while chunk := sock.recv(65536):
        raw += chunk
    return raw


def _tokens_in(raw: bytes) -> int:
    _, _, body = raw.partition(b"\r\n\r\n")
    return sum(
        len(json.loads(line[len(b"data: ") :])["choices"][0]["logprobs"]["tokens"])
        for line in body.split(b"\n")
        if line.startswith(b"data: {")
    )


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_a_client_that_pipelined_a_request_and_left_is_seen_to_leave(system, tmp_path, stream):
    """uvicorn stopped reading a connection at the first byte of a pipelined request: a client that then
    hung up was not seen to leave. Its completion ran on to its end, a streamed one until a write failed,
    and a non-streamed one was billed whole though nothing was delivered."""
    tenant, _, key = system.new_tenant()
    http = start_http_worker(system, tmp_path)
    pause = EnginePause(http.worker)
    body = {"model": "ad3", "prompt": PROMPT, "max_tokens": 300, "stream": stream, "logprobs": 0}
    try:
        sock = socket.create_connection(("127.0.0.1", http.worker.http.port), timeout=30)
        sock.sendall(_post(key, body, f"pipe-{uuid.uuid4().hex}"))
        scheduler = http.worker.engine.engine.scheduler
        deadline = time.monotonic() + 20
        while not any(seq.num_output_tokens >= 3 for seq in list(scheduler.running)):
            assert time.monotonic() < deadline, "the request never generated"
            time.sleep(0.005)
        pause.pause()  # no token is made from here on
        sock.sendall(_models(key))  # the next request, before this one's answer
        while _held_bytes(http) == 0:
            assert time.monotonic() < deadline, "the pipelined request never reached the worker"
            time.sleep(0.005)
        raw = b""
        if stream:
            sock.settimeout(0.5)
            try:
                while chunk := sock.recv(65536):
                    raw += chunk
            except TimeoutError:
                pass
        sock.close()
        while scheduler.num_running or scheduler.num_waiting or http.worker.state.in_flight:
            assert time.monotonic() < deadline, "the request went on after its client left"
            time.sleep(0.01)
        pause.resume()
        time.sleep(0.6)  # past a checkpoint period
        system.loop.run(http.worker.usage.flush())
        usage = system.admin.usage(tenant)
        if stream:
            assert (usage.total_requests, usage.total_completion_tokens) == (1, _tokens_in(raw))
        else:
            assert usage.total_requests == 0  # nothing was delivered
    finally:
        pause.restore()
        system.loop.run(http.worker.stop(1.0))


def test_pipelined_requests_are_answered_in_order_after_a_stream(http_worker, tenant):
    key = tenant[2]
    sock = socket.create_connection(("127.0.0.1", http_worker.worker.http.port), timeout=30)
    streamed = {"model": "tiny", "prompt": PROMPT, "max_tokens": 5, "stream": True}
    sock.sendall(
        _post(key, streamed)
        + _models(key)
        + _post(key, {"model": "tiny", "prompt": PROMPT, "max_tokens": 2})
        + b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    raw = _read_until_closed(sock)
    sock.close()
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)
    assert statuses == [b"200", b"200", b"200", b"401"]
    assert raw.index(b"data: [DONE]") < raw.index(b'"object":"list"') < raw.index(b'"completion_tokens": 2')


def test_pipelined_bytes_past_the_limit_close_the_connection_after_the_answer(system, tmp_path):
    """The worker keeps at most MAX_PIPELINED_BYTES of requests sent ahead; past them it answers the
    request in progress and closes the connection (the client sends the rest again, as HTTP/1.1 clients
    do when a connection closes with pipelined requests unanswered), reading on to see it leave."""
    _, _, key = system.new_tenant()
    http = start_http_worker(system, tmp_path)
    pause = EnginePause(http.worker)
    try:
        sock = socket.create_connection(("127.0.0.1", http.worker.http.port), timeout=30)
        pause.pause()
        sock.sendall(_post(key, {"model": "tiny", "prompt": PROMPT, "max_tokens": 3}))
        scheduler = http.worker.engine.engine.scheduler
        deadline = time.monotonic() + 20
        while scheduler.num_waiting < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        ahead = _models(key) * (4 * server.MAX_PIPELINED_BYTES // len(_models(key)))
        sock.sendall(ahead)
        connections = http.worker.http._server.server_state.connections
        while not any(protocol.cycle and not protocol.cycle.keep_alive for protocol in list(connections)):
            assert time.monotonic() < deadline, "the bytes past the limit were never read"
            time.sleep(0.01)
        assert _held_bytes(http) <= server.MAX_PIPELINED_BYTES
        pause.resume()
        raw = _read_until_closed(sock)  # the answer, then the close
        sock.close()
        assert raw.startswith(b"HTTP/1.1 200 ") and raw.count(b"HTTP/1.1 ") == 1
        assert b'"completion_tokens": 3' in raw
    finally:
        pause.restore()
        system.loop.run(http.worker.stop(1.0))
