"""A connection that never finishes its request headers is closed after HEADER_TIMEOUT_S (uvicorn alone
keeps it forever: 1,500 such connections, no key needed, held 1,500 descriptors of the worker), while a
connection that sends its request in time is served as before. A body that stops short of its declared
length is answered 408 after the body deadline and its connection closed."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from urllib.parse import urlparse

import httpx

from data_plane.server.openai_http import server

from .conftest import start_http_worker


def test_a_connection_without_request_headers_is_closed_and_others_are_served(system, tmp_path, monkeypatch):
    monkeypatch.setattr(server, "HEADER_TIMEOUT_S", 0.5)
    running = start_http_worker(system, tmp_path / "worker")
    try:
        url = urlparse(running.base_url)
        silent = socket.create_connection((url.hostname, url.port), timeout=10)
        dripping = socket.create_connection((url.hostname, url.port), timeout=10)
        dripping.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        deadline = time.monotonic() + 10
        for conn in (silent, dripping):
            conn.settimeout(max(0.1, deadline - time.monotonic()))
            assert conn.recv(1024) == b""  # closed by the server, well before the 10 s deadline
            conn.close()
        # A request sent in time is not affected (401: no key, but an answer).
        assert httpx.get(f"{running.base_url}/models", timeout=10).status_code == 401
    finally:
        system.loop.run(running.worker.stop(1.0))


def test_a_body_that_stops_short_is_answered_408_and_its_connection_closed(http_worker, tenant, monkeypatch):
    """Headers and 1 byte of a declared 64-byte body, then nothing: the call waited for the rest forever.
    With a valid key it is answered 408 after the body deadline; with a key that is not one, 401 at once
    (the body is never waited for); the connection is closed either way."""
    api = http_worker.worker.http._app.state.api
    monkeypatch.setattr(api, "body_timeout_s", 0.5)
    url = urlparse(http_worker.base_url)
    for key in (tenant[2], "not-a-key"):
        conn = socket.create_connection((url.hostname, url.port), timeout=10)
        conn.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {key}\r\nContent-Length: 64\r\n\r\n{{".encode()
        )
        answer = b""
        while chunk := conn.recv(4096):  # until the server closes the connection
            answer += chunk
        conn.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        error = json.loads(body)["error"]
        assert b"connection: close" in head.lower()
        if key == "not-a-key":
            assert head.startswith(b"HTTP/1.1 401 ") and error["code"] == "unauthenticated"
            continue
        assert head.startswith(b"HTTP/1.1 408 ")
        assert error["code"] == "deadline_exceeded" and error["type"] == "invalid_request_error"
        assert error["message"] == "the body did not arrive within 0.5 s"


def _read_response(conn: socket.socket) -> bytes:
    """One whole response's head (its body, of the length it declares, read and dropped)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(
            line.split(b":")[1] for line in head.lower().split(b"\r\n") if line.startswith(b"content-length")
        )
    )
    while len(body) < length:
        body += conn.recv(65536)
    return head


def test_a_kept_alive_connection_must_send_each_next_requests_headers_in_time(system, tmp_path, monkeypatch):
    """After a response, a partial next request line (which cancels uvicorn's keep-alive timeout) held
    the connection for ever: 4,095 of them, no key needed, filled the connection cap for every tenant.
    The next request's headers now have the same deadline as the first's; a client that sends them in
    time is served on the same connection as before."""
    monkeypatch.setattr(server, "HEADER_TIMEOUT_S", 0.5)
    running = start_http_worker(system, tmp_path / "worker")
    try:
        url = urlparse(running.base_url)
        conn = socket.create_connection((url.hostname, url.port), timeout=10)
        request = b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
        for _ in range(2):  # served, and kept alive, as long as each request comes in time
            conn.sendall(request)
            head = _read_response(conn)
            assert head.startswith(b"HTTP/1.1 404 ") and b"connection: close" not in head.lower()
            time.sleep(0.2)
        conn.sendall(b"GET /nope HTTP/1.1\r\n")  # and never the rest
        started = time.monotonic()
        conn.settimeout(10)
        assert conn.recv(1024) == b""  # closed by the server
        assert time.monotonic() - started < 5
        conn.close()
    finally:
        system.loop.run(running.worker.stop(1.0))


def test_past_the_connection_cap_a_request_gets_openais_503_with_retry_after(system, tmp_path, monkeypatch):
    """uvicorn's own answer past its cap was a plain-text 503 without Retry-After, which the official
    clients do not read as an error object or back off on."""
    monkeypatch.setattr(server, "MAX_CONNECTIONS", 3)
    running = start_http_worker(system, tmp_path / "worker")
    held = []
    try:
        url = urlparse(running.base_url)
        held = [socket.create_connection((url.hostname, url.port), timeout=10) for _ in range(3)]
        time.sleep(0.2)  # accepted by the server
        over = httpx.get(f"{running.base_url}/models", timeout=10)
        assert over.status_code == 503
        assert over.headers["retry-after"] == "1" and over.headers["connection"] == "close"
        error = over.json()["error"]
        assert error["type"] == "service_unavailable_error" and "3 HTTP connections" in error["message"]
        for conn in held:
            conn.close()
        time.sleep(0.2)
        assert httpx.get(f"{running.base_url}/models", timeout=10).status_code == 401  # served again
    finally:
        for conn in held:
            conn.close()
        system.loop.run(running.worker.stop(1.0))


def _raw_answer(base_url: str, request: bytes) -> tuple[bytes, dict]:
    url = urlparse(base_url)
    conn = socket.create_connection((url.hostname, url.port), timeout=10)
    try:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):  # until the server closes the connection
            answer += chunk
    finally:
        conn.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, json.loads(body)["error"]


def test_headers_past_the_size_limit_are_431_and_bad_http_400_in_openais_error_object(http_worker):
    """uvicorn answered both as a plain-text 400 'Invalid HTTP request received.'; a 200 KB header is a
    431 (Request Header Fields Too Large) and a request line that is not HTTP a 400, each with OpenAI's
    error object, and the connection is closed."""
    huge = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n"
    head, error = _raw_answer(http_worker.base_url, huge)
    assert head.startswith(b"HTTP/1.1 431 ") and b"connection: close" in head.lower()
    assert (
        error["type"] == "invalid_request_error" and "headers are larger than 16384 bytes" in error["message"]
    )
    head, error = _raw_answer(http_worker.base_url, b"NOT HTTP AT ALL\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"application/json" in head.lower()
    assert error["code"] == "invalid_argument" and "not valid HTTP/1.1" in error["message"]


def test_connections_past_the_cap_and_its_overflow_hold_no_descriptor(system, tmp_path, monkeypatch):
    """Connections past the cap were each held HEADER_TIMEOUT_S, with no bound on how many: a client with
    no key that opened them faster than they expired took every descriptor of the worker (its gRPC
    listener stopped accepting). Past the cap a connection gets OVER_CAPACITY_HEADER_TIMEOUT_S to send
    its request (answered 503); past the cap and its overflow it is closed as it arrives. Those within
    the cap are held as before."""
    monkeypatch.setattr(server, "MAX_CONNECTIONS", 3)
    monkeypatch.setattr(server, "OVERFLOW_CONNECTIONS", 2, raising=False)
    monkeypatch.setattr(server, "HEADER_TIMEOUT_S", 30.0)
    monkeypatch.setattr(server, "OVER_CAPACITY_HEADER_TIMEOUT_S", 0.5, raising=False)
    running = start_http_worker(system, tmp_path / "worker")
    held, over = [], []
    try:
        url = urlparse(running.base_url)
        held = [socket.create_connection((url.hostname, url.port), timeout=10) for _ in range(3)]
        time.sleep(0.3)  # accepted by the server
        over = [socket.create_connection((url.hostname, url.port), timeout=10) for _ in range(6)]
        started = time.monotonic()
        for conn in over:  # all closed well before HEADER_TIMEOUT_S: 4 at once, 2 after 0.5 s
            conn.settimeout(max(0.1, 5 - (time.monotonic() - started)))
            assert conn.recv(1024) == b""
        assert time.monotonic() - started < 5
        open_now = running.worker.http._server.server_state.connections
        assert len(open_now) == 3
        for conn in held:  # the ones within the cap are still open
            conn.setblocking(False)
            with contextlib.suppress(BlockingIOError):  # nothing to read: open
                assert conn.recv(1024) != b""
        # a request past the cap, within the overflow, is still answered with OpenAI's 503
        over_cap = httpx.get(f"{running.base_url}/models", timeout=10)
        assert over_cap.status_code == 503 and over_cap.headers["retry-after"] == "1"
    finally:
        for conn in held + over:
            conn.close()
        system.loop.run(running.worker.stop(1.0))


def test_a_body_refused_as_too_large_closes_its_connection(http_worker, tenant):
    """413 is answered before the body is read (a client that sent `Expect: 100-continue` never sends
    it): the connection stayed open, and the client's next request on it was read as the refused body's
    bytes, never answered."""
    url = urlparse(http_worker.base_url)
    conn = socket.create_connection((url.hostname, url.port), timeout=30)
    conn.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {tenant[2]}\r\nContent-Length: {8 * 1024 * 1024}\r\n\r\n".encode()
    )
    head = _read_response(conn)
    conn.close()
    assert head.startswith(b"HTTP/1.1 413 ")
    assert b"connection: close" in head.lower()


def test_a_body_sent_at_once_despite_expect_100_continue_gets_its_whole_413(http_worker, tenant):
    """A client may send `Expect: 100-continue` and its body without waiting for `100 Continue`: the
    connection closed at once on its unread bytes, and the reset destroyed the 413 (its status line read,
    its error object lost) before the client read it. It closes lingering, the answer delivered whole."""
    url = urlparse(http_worker.base_url)
    length = 8 * 1024 * 1024
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {tenant[2]}\r\nContent-Length: {length}\r\n\r\n".encode()
    )
    for _ in range(25):  # a reset loses the answer only when it arrives before the client reads it
        conn = socket.create_connection((url.hostname, url.port), timeout=30)
        sender = threading.Thread(target=_send_ignoring_errors, args=(conn, head + b" " * length))
        sender.start()
        try:
            answer = _read_whole_response(conn)
        finally:
            sender.join()
            conn.close()
        status, _, body = answer.partition(b"\r\n")
        assert status.startswith(b"HTTP/1.1 413 ")
        assert "larger than" in json.loads(body.partition(b"\r\n\r\n")[2])["error"]["message"]


def _send_ignoring_errors(conn: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):
        conn.sendall(data)


def _read_whole_response(conn: socket.socket) -> bytes:
    """One response, head and body (of the length it declares); b"" when the connection ends first."""
    data = b""
    with contextlib.suppress(OSError):
        while b"\r\n\r\n" not in data and (part := conn.recv(65536)):
            data += part
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.lower().split(b"\r\n")
            if line.startswith(b"content-length")
        )
        while len(body) < length and (part := conn.recv(65536)):
            body += part
        return head + b"\r\n\r\n" + body
    return data
