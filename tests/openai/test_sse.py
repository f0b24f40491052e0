"""Raw HTTP against the streaming endpoints: the SSE bytes, and a client that leaves mid-stream."""

from __future__ import annotations

import json
import socket
import time
import uuid

import httpx
import pytest

from tests.openai.conftest import EnginePause, start_http_worker

PROMPT = "the quick brown fox"


def _events(raw: bytes) -> list[bytes]:
    assert raw.endswith(b"\n\n")
    return raw[:-2].split(b"\n\n")


def test_stream_is_data_events_of_chunks_then_usage_then_done(http_worker, tenant):
    headers = {"Authorization": f"Bearer {tenant[2]}", "X-Request-Id": f"sse-{uuid.uuid4().hex}"}
    body = {
        "model": "ad0",
        "prompt": PROMPT,
        "max_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.Client(base_url=http_worker.base_url, timeout=30) as http:
        with http.stream("POST", "/completions", headers=headers, json=body) as response:
            raw = response.read()
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-request-id"] == headers["X-Request-Id"]
    events = _events(raw)
    assert events[-1] == b"data: [DONE]"
    assert all(e.startswith(b"data: {") and b"\n" not in e for e in events[:-1])
    chunks = [json.loads(e[len(b"data: ") :]) for e in events[:-1]]
    *texts, usage = chunks
    assert {c["id"] for c in chunks} == {f"cmpl-{headers['X-Request-Id']}"}
    assert all(c["object"] == "text_completion" and c["model"] == "ad0" for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in texts] == [None] * (len(texts) - 1) + ["length"]
    assert all(c["usage"] is None for c in texts)
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6

    whole = httpx.post(
        http_worker.base_url + "/completions",
        headers={"Authorization": headers["Authorization"]},
        json={**body, "stream": False, "stream_options": None},
        timeout=30,
    ).json()
    assert "".join(c["choices"][0]["text"] for c in texts) == whole["choices"][0]["text"]


def test_chat_stream_opens_with_the_assistant_role(http_worker, tenant):
    headers = {"Authorization": f"Bearer {tenant[2]}"}
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 4,
        "stream": True,
    }
    raw = httpx.post(
        http_worker.base_url + "/chat/completions", headers=headers, json=body, timeout=30
    ).content
    events = _events(raw)
    chunks = [json.loads(e[len(b"data: ") :]) for e in events[:-1]]
    assert events[-1] == b"data: [DONE]"
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "usage" not in chunks[0]  # asked for only with stream_options.include_usage


def _request(port: int, key: str, request_id: str, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {key}\r\nX-Request-Id: {request_id}\r\nContent-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return sock


def _tokens_in(raw: bytes) -> int:
    """Tokens of the complete events received (each carries its tokens' logprobs)."""
    _, _, body = raw.partition(b"\r\n\r\n")
    count = 0
    for line in body.split(b"\n"):
        if line.startswith(b"data: {"):  # chunked transfer: each event line stands whole on its own line
            count += len(json.loads(line[len(b"data: ") :])["choices"][0]["logprobs"]["tokens"])
    return count


def _requests_total(base_url: str, code: str) -> float:
    text = httpx.get(base_url.removesuffix("/v1") + "/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(f'openlora_requests_total{{code="{code}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_a_client_that_disconnects_mid_stream_is_billed_what_it_received_once(system, tmp_path):
    tenant, _, key = system.new_tenant()
    http = start_http_worker(system, tmp_path, http_metrics=True)
    pause = EnginePause(http.worker)
    request_id = f"cut-{uuid.uuid4().hex}"
    try:
        cancelled_before = _requests_total(http.base_url, "CANCELLED")
        sock = _request(
            http.worker.http.port,
            key,
            request_id,
            {"model": "ad4", "prompt": PROMPT, "max_tokens": 300, "stream": True, "logprobs": 0},
        )
        raw = sock.recv(65536)
        while _tokens_in(raw) < 3:
            raw += sock.recv(65536)
        pause.pause()  # no token is made from here on: what the server sent is all the client gets
        sock.settimeout(0.5)
        try:
            while chunk := sock.recv(65536):
                raw += chunk
        except TimeoutError:
            pass
        received = _tokens_in(raw)
        sock.close()
        deadline = time.monotonic() + 20
        while _requests_total(http.base_url, "CANCELLED") == cancelled_before:
            assert time.monotonic() < deadline, "the disconnect never cancelled the request"
            time.sleep(0.02)
        pause.resume()
        system.loop.run(http.worker.usage.flush())
        usage = system.wait_usage(tenant, 1)
        assert (usage.total_requests, usage.total_completion_tokens) == (1, received)
        assert 3 <= received < 300
        again = httpx.post(
            http.base_url + "/completions",
            headers={"Authorization": f"Bearer {key}", "X-Request-Id": request_id},
            json={"model": "ad4", "prompt": PROMPT, "max_tokens": 2},
            timeout=30,
        )
        assert again.status_code == 409  # billed: the id is used
        time.sleep(1.0)  # let any second record (a checkpoint) reach the control plane
        system.loop.run(http.worker.usage.flush())
        assert (
            system.admin.usage(tenant).total_requests,
            system.admin.usage(tenant).total_completion_tokens,
        ) == (
            1,
            received,
        )
    finally:
        pause.restore()
        system.loop.run(http.worker.stop(1.0))


@pytest.mark.parametrize("stream", [True, False])
def test_a_disconnect_before_the_first_token_cancels_the_request(system, tmp_path, stream):
    _, _, key = system.new_tenant()
    http = start_http_worker(system, tmp_path)
    pause = EnginePause(http.worker)
    try:
        pause.pause()
        sock = _request(
            http.worker.http.port,
            key,
            f"early-{uuid.uuid4().hex}",
            {"model": "tiny", "prompt": PROMPT, "max_tokens": 50, "stream": stream},
        )
        scheduler = http.worker.engine.engine.scheduler
        deadline = time.monotonic() + 20
        while scheduler.num_waiting < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        sock.close()
        while scheduler.num_waiting or scheduler.num_running:  # aborted while the engine makes no step
            assert time.monotonic() < deadline, "the request stayed in the engine"
            time.sleep(0.01)
        assert http.worker.state.in_flight == 0
    finally:
        pause.restore()
        system.loop.run(http.worker.stop(1.0))


def test_a_non_streamed_request_cut_short_is_billed_nothing_and_its_id_can_be_retried(system, tmp_path):
    tenant, _, key = system.new_tenant()
    http = start_http_worker(system, tmp_path, http_metrics=True)
    pause = EnginePause(http.worker)
    request_id = f"whole-{uuid.uuid4().hex}"
    body = {"model": "ad6", "prompt": PROMPT, "max_tokens": 300}
    try:
        cancelled_before = _requests_total(http.base_url, "CANCELLED")
        sock = _request(http.worker.http.port, key, request_id, body)
        scheduler = http.worker.engine.engine.scheduler
        deadline = time.monotonic() + 20
        while not any(seq.num_output_tokens >= 3 for seq in list(scheduler.running)):
            assert time.monotonic() < deadline, "the request never generated"
            time.sleep(0.005)
        pause.pause()
        sock.close()  # before any byte of the response: the client received nothing
        while _requests_total(http.base_url, "CANCELLED") == cancelled_before:
            assert time.monotonic() < deadline, "the disconnect never cancelled the request"
            time.sleep(0.02)
        pause.resume()
        time.sleep(0.6)  # past a checkpoint period: none may have been spooled either
        system.loop.run(http.worker.usage.flush())
        assert system.admin.usage(tenant).total_requests == 0
        retry = httpx.post(
            http.base_url + "/completions",
            headers={"Authorization": f"Bearer {key}", "X-Request-Id": request_id},
            json={**body, "max_tokens": 4},
            timeout=30,
        )
        assert retry.status_code == 200 and retry.json()["usage"]["completion_tokens"] == 4
    finally:
        pause.restore()
        system.loop.run(http.worker.stop(1.0))


def _post_raw_headers(http_worker, headers: list[tuple[bytes, bytes]], body: dict) -> httpx.Response:
    return httpx.post(http_worker.base_url + "/completions", headers=headers, json=body, timeout=30)


def test_a_utf8_request_id_is_one_key_with_grpc_and_echoed_as_sent(http_worker, tenant):
    """The ASGI server decodes header values as latin-1: "ñ" reached the worker as "Ã±", so the same id
    over gRPC was a second key (served and billed twice) and the echoed header was not the one sent."""
    import grpc

    from openlora import errors
    from openlora.client import Client

    key = tenant[2]
    request_id = f"ñ-{uuid.uuid4().hex}"
    auth = (b"Authorization", f"Bearer {key}".encode())
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 2}
    response = _post_raw_headers(http_worker, [auth, (b"X-Request-Id", request_id.encode())], body)
    assert response.status_code == 200, response.text
    assert dict(response.headers.raw)[b"x-request-id"] == request_id.encode()
    assert response.json()["id"] == f"cmpl-{request_id}"
    with Client(http_worker.grpc_target, key) as client, pytest.raises(errors.OpenLoRAError) as refusal:
        client.complete(PROMPT, max_tokens=2, request_id=request_id)
    assert refusal.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert refusal.value.details.startswith(f"request_id {request_id!r} is already used")


@pytest.mark.parametrize(
    "id_headers",
    [
        [(b"X-Request-Id", b"one"), (b"X-Request-Id", b"two")],  # a proxy may read the other one
        [(b"X-Request-Id", b"\xff\xfe-not-utf8")],
    ],
    ids=["twice", "not-utf8"],
)
def test_a_request_id_header_given_twice_or_not_utf8_is_refused_naming_it(http_worker, tenant, id_headers):
    auth = (b"Authorization", f"Bearer {tenant[2]}".encode())
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 2}
    response = _post_raw_headers(http_worker, [auth, *id_headers], body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "X-Request-Id"


def test_a_client_that_leaves_while_sending_its_body_is_counted_cancelled_not_internal(system, tmp_path):
    """A client that hangs up halfway through its body (a timeout, a killed process) was counted as a
    worker fault, `openlora_requests_total{code="INTERNAL"}`, which operators alert on."""
    _, _, key = system.new_tenant()
    http = start_http_worker(system, tmp_path, http_metrics=True)
    try:
        internal_before = _requests_total(http.base_url, "INTERNAL")
        cancelled_before = _requests_total(http.base_url, "CANCELLED")
        data = json.dumps({"model": "tiny", "prompt": PROMPT, "max_tokens": 2}).encode()
        sock = socket.create_connection(("127.0.0.1", http.worker.http.port), timeout=30)
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {key}\r\nContent-Length: {len(data)}\r\n\r\n".encode()
            + data[:10]
        )
        time.sleep(0.5)  # the key is checked and the body's reading has begun
        sock.close()
        deadline = time.monotonic() + 20
        while _requests_total(http.base_url, "CANCELLED") == cancelled_before:
            assert _requests_total(http.base_url, "INTERNAL") == internal_before
            assert time.monotonic() < deadline, "the disconnect was never counted"
            time.sleep(0.02)
        assert _requests_total(http.base_url, "INTERNAL") == internal_before
    finally:
        system.loop.run(http.worker.stop(1.0))


def test_with_a_stream_interval_each_event_but_the_first_and_last_carries_that_many_tokens(system, tmp_path):
    """`--stream-interval 3` on the HTTP stream: the first event holds the first token alone, the next
    ones at least three tokens' text (logprobs count the tokens), then the usage event and [DONE], the same
    text as a non-streamed answer."""
    running = start_http_worker(system, tmp_path / "interval", stream_interval=3)
    try:
        _, _, key = system.new_tenant()
        headers = {"Authorization": f"Bearer {key}"}
        body = {"model": "ad0", "prompt": PROMPT, "max_tokens": 10, "temperature": 0, "logprobs": 0}
        streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.Client(base_url=running.base_url, timeout=30) as http:
            with http.stream("POST", "/completions", headers=headers, json=streamed) as response:
                raw = response.read()
            whole = http.post("/completions", headers=headers, json=body).json()
        events = _events(raw)
        assert events[-1] == b"data: [DONE]"
        *texts, usage = [json.loads(e[len(b"data: ") :]) for e in events[:-1]]
        tokens = [len(c["choices"][0]["logprobs"]["tokens"]) for c in texts]
        assert tokens[0] == 1 and sum(tokens) == 10 and all(n >= 3 for n in tokens[1:-1]) and len(tokens) <= 4
        assert texts[-1]["choices"][0]["finish_reason"] == "length"
        assert usage["usage"]["completion_tokens"] == 10
        assert "".join(c["choices"][0]["text"] for c in texts) == whole["choices"][0]["text"]
    finally:
        system.loop.run(running.worker.stop(1.0))
