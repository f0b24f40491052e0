"""Request bodies sent with Transfer-Encoding: chunked: served whole up to MAX_BODY_CHUNKS chunks; past
them refused with a 400 naming the limit and the connection closed (h11 parses each chunk's framing on
the event loop: a body in 1-byte chunks cost it a second per megabyte on the wire)."""

from __future__ import annotations

import json
import socket

import pytest

from data_plane.server.openai_http import server

PROMPT = "the quick brown fox"


def _chunked_post(port: int, key: str, body: bytes, num_chunks: int) -> bytes:
    """Sends `body` in `num_chunks` chunks (the last takes what is left) and returns the whole answer."""
    size = len(body) // num_chunks
    last = (num_chunks - 1) * size
    pieces = [body[i * size : (i + 1) * size] for i in range(num_chunks - 1)] + [body[last:]]
    framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
        + f"Authorization: Bearer {key}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        + framed
    )
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except ConnectionResetError:
        pass
    sock.close()
    return answer


@pytest.mark.parametrize("extra_chunks", [0, 1])
def test_a_body_in_more_chunks_than_the_limit_is_refused_naming_it(http_worker, tenant, extra_chunks):
    num_chunks = server.MAX_BODY_CHUNKS + extra_chunks
    body = json.dumps({"model": "tiny", "prompt": PROMPT, "max_tokens": 2}).encode()
    body = body[:-1] + b" " * num_chunks + b"}"  # room for a byte in each chunk
    answer = _chunked_post(http_worker.worker.http.port, tenant[2], body, num_chunks)
    head, _, payload = answer.partition(b"\r\n\r\n")
    if not extra_chunks:
        assert head.startswith(b"HTTP/1.1 200 "), answer[:300]
        assert json.loads(payload)["usage"]["completion_tokens"] == 2
        return
    assert head.startswith(b"HTTP/1.1 400 "), answer[:300]
    assert b"connection: close" in head.lower()
    error = json.loads(payload)["error"]
    assert f"more than {server.MAX_BODY_CHUNKS} chunks" in error["message"]
    assert error["type"] == "invalid_request_error"
