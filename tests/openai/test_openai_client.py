"""The official `openai` client, unmodified, against a worker's OpenAI-compatible API on loopback."""

from __future__ import annotations

import contextlib
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import openai
import pytest

from openlora import errors
from openlora.client import Client

PROMPT = "the quick brown fox"


def _client(http_worker, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=http_worker.base_url, api_key=key, max_retries=0)


def _grpc(http_worker, key: str, **kwargs) -> tuple[list[int], list[float], str]:
    token_ids, logprobs, text = [], [], ""
    with Client(http_worker.grpc_target, key) as client:
        for response in client.generate_stream(**kwargs):
            token_ids += response.token_ids
            logprobs += response.logprobs
            text += response.text
    return token_ids, logprobs, text


def _spelled(system, token_ids: list[int]) -> list[str]:
    from data_plane.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(system.model_dir)
    return [tokenizer.decode([t]) for t in token_ids]


def _legacy_spelled(system, token_ids: list[int]) -> list[str]:
    """The legacy API's spelling: a token's text, or `bytes:\\xNN...` for one that holds part of a
    character."""
    from data_plane.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(system.model_dir)
    spelled = []
    for t in token_ids:
        data = tokenizer.token_bytes(t)
        try:
            spelled.append(data.decode())
        except UnicodeDecodeError:
            spelled.append("bytes:" + "".join(f"\\x{b:02x}" for b in data))
    return spelled


def test_models_list_names_the_base_model_first(http_worker, tenant):
    models = _client(http_worker, tenant[2]).models.list()
    assert models.data[0].id == "tiny"
    assert models.data[0].owned_by == "openlora"


@contextlib.contextmanager
def _plugged_catalog(http_worker, names):
    """The worker's model catalog answers `names`, each a model of the caller's tenant on the base model."""
    from data_plane.server.openai_http.app import ModelCard

    api = http_worker.worker.http._app.state.api

    async def catalog(api_key, auth):
        return [ModelCard(name, auth.tenant, "tiny") for name in names]

    api.list_models, listed_before = catalog, api.list_models
    try:
        yield
    finally:
        api.list_models = listed_before


def test_models_list_pages_what_a_catalog_plugs_in(http_worker, tenant):
    with _plugged_catalog(http_worker, [f"mix-{i}" for i in range(3)]):
        client = _client(http_worker, tenant[2])
        first = client.models.list(extra_query={"limit": 2})
        assert [m.id for m in first.data] == ["tiny", "mix-0"] and first.has_more
        rest = client.models.list(extra_query={"limit": 2, "after": "mix-0"})
        assert [m.id for m in rest.data] == ["mix-1", "mix-2"] and not rest.has_more
        assert rest.data[0].parent == "tiny" and rest.data[0].owned_by == tenant[0]


def test_models_list_without_a_limit_lists_every_model(http_worker, tenant):
    """The official clients' `models.list()` never asks for a next page (OpenAI's /v1/models is not
    paged): a key with 150 models saw the first 100 and no sign of the rest."""
    with _plugged_catalog(http_worker, [f"mix-{i:03d}" for i in range(150)]):
        client = _client(http_worker, tenant[2])
        ids = [m.id for m in client.models.list()]
        assert ids == ["tiny"] + [f"mix-{i:03d}" for i in range(150)]
        raw = httpx.get(
            f"{http_worker.base_url}/models", headers={"Authorization": f"Bearer {tenant[2]}"}, timeout=10
        ).json()
        assert raw["has_more"] is False and raw["last_id"] == "mix-149"
        after = client.models.list(extra_query={"after": "mix-100"})
        assert [m.id for m in after.data] == [f"mix-{i:03d}" for i in range(101, 150)]


def test_completion_tokens_and_logprobs_equal_grpc_for_the_same_greedy_request(system, http_worker, tenant):
    key = tenant[2]
    token_ids, logprobs, text = _grpc(
        http_worker, key, prompt=PROMPT, adapter="ad3", max_tokens=12, logprobs=True
    )
    completion = _client(http_worker, key).completions.create(
        model="ad3", prompt=PROMPT, max_tokens=12, logprobs=0, temperature=0
    )
    choice = completion.choices[0]
    assert choice.text == text
    assert choice.logprobs.tokens == _legacy_spelled(system, token_ids)
    assert any(t.startswith("bytes:") for t in choice.logprobs.tokens)  # U+FFFD for them before
    assert choice.logprobs.token_logprobs == pytest.approx(logprobs, abs=1e-6)
    assert choice.finish_reason == "length"
    assert completion.usage.completion_tokens == 12
    assert completion.model == "ad3"


def test_completion_text_offsets_place_each_token_in_the_text_whole_and_streamed(system, http_worker, tenant):
    """`text_offset` (null before) gives each token's start in the completion's text: where the characters
    completed by the tokens before it end (a token holding part of a character begins where the character
    does); a stream's offsets run on across its chunks."""
    from data_plane.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(system.model_dir)
    client = _client(http_worker, tenant[2])
    completion = client.completions.create(
        model="ad3", prompt=PROMPT, max_tokens=12, logprobs=0, temperature=0
    )
    text, logprobs = completion.choices[0].text, completion.choices[0].logprobs
    token_ids = _grpc(http_worker, tenant[2], prompt=PROMPT, adapter="ad3", max_tokens=12, logprobs=True)[0]
    prompt_ids = tokenizer.encode(PROMPT)
    prompt_text = tokenizer.decode(prompt_ids)
    for i, offset in enumerate(logprobs.text_offset):  # the text before token i, decoded in context
        before = tokenizer.decode(prompt_ids + token_ids[:i])[len(prompt_text) :].rstrip("\ufffd")
        assert offset == len(before) <= len(text), i
        assert text.startswith(before), i
    streamed = []
    for chunk in client.completions.create(
        model="ad3", prompt=PROMPT, max_tokens=12, logprobs=0, temperature=0, stream=True
    ):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.text_offset
    assert streamed == logprobs.text_offset


def test_chat_tokens_and_logprobs_equal_grpc_on_the_rendered_template(system, http_worker, tenant):

    key = tenant[2]
    rendered = "user: the quick brown fox\nassistant:"
    token_ids, logprobs, text = _grpc(
        http_worker, key, prompt=rendered, adapter="ad1", max_tokens=10, logprobs=True
    )
    chat = _client(http_worker, key).chat.completions.create(
        model="ad1",
        messages=[{"role": "user", "content": "the quick brown fox"}],
        max_completion_tokens=10,
        logprobs=True,
    )
    assert chat.choices[0].message.content == text
    assert chat.choices[0].message.role == "assistant"
    assert [c.token for c in chat.choices[0].logprobs.content] == _spelled(system, token_ids)
    assert [c.logprob for c in chat.choices[0].logprobs.content] == pytest.approx(logprobs, abs=1e-6)
    with_kwargs = _client(
        http_worker, key
    ).chat.completions.create(  # vLLM's extension, as its clients send it
        model="ad1",
        messages=[{"role": "user", "content": "the quick brown fox"}],
        max_completion_tokens=10,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},  # a variable this template ignores
    )
    assert with_kwargs.choices[0].message.content == text


def test_streamed_completion_and_chat_equal_the_whole_ones(http_worker, tenant):
    client = _client(http_worker, tenant[2])
    whole = client.completions.create(model="ad0", prompt=PROMPT, max_tokens=9)
    stream = client.completions.create(
        model="ad0", prompt=PROMPT, max_tokens=9, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

    messages = [{"role": "user", "content": PROMPT}]
    whole_chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=7)
    deltas = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=7, stream=True))
    assert deltas[0].choices[0].delta.role == "assistant"
    assert "".join(d.choices[0].delta.content or "" for d in deltas) == whole_chat.choices[0].message.content
    assert deltas[-1].choices[0].finish_reason == "length"


def test_a_reply_given_back_as_the_client_dumps_it_continues_the_chat(http_worker, tenant):
    """`messages.append(reply.choices[0].message.model_dump())` holds the reply's fields the server did not
    send as null (`refusal`, `tool_calls`, ...): each was refused as unsupported, so the conversation's next
    call failed. A null one is taken as absent; a value is still refused by name."""
    client = _client(http_worker, tenant[2])
    messages = [{"role": "user", "content": PROMPT}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=3).choices[0].message
    dumped = reply.model_dump()
    assert dumped["refusal"] is None and dumped["tool_calls"] is None
    follow_up = [*messages, dumped, {"role": "user", "content": "the lazy dog"}]
    with_nulls = client.chat.completions.create(model="tiny", messages=follow_up, max_tokens=3)
    without = [*messages, {"role": "assistant", "content": reply.content}, follow_up[-1]]
    plain = client.chat.completions.create(model="tiny", messages=without, max_tokens=3)
    assert with_nulls.choices[0].message.content == plain.choices[0].message.content
    follow_up[1] = {**dumped, "refusal": "no"}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny", messages=follow_up, max_tokens=3)
    assert refused.value.body["param"] == "messages[1].refusal"


def test_mix_in_extra_body_equals_the_grpc_mix(http_worker, tenant):
    key = tenant[2]
    mix = {"ad0": 0.5, "ad1": 0.5}
    _, _, text = _grpc(http_worker, key, prompt=PROMPT, mix=mix, max_tokens=10)
    completion = _client(http_worker, key).completions.create(
        model="tiny", prompt=PROMPT, max_tokens=10, extra_body={"mix": mix, "mix_method": "linear"}
    )
    assert completion.choices[0].text == text
    alone = _client(http_worker, key).completions.create(model="ad0", prompt=PROMPT, max_tokens=10)
    assert alone.choices[0].text != text  # the mix is not one of its members


def test_each_error_status_raises_the_openai_client_class(system, http_worker, tenant):
    owner, _, owner_key = system.new_tenant()
    private = f"private-{uuid.uuid4().hex[:6]}"
    system.admin.push(system.model_dir / "adapters" / "ad2", private, owner, "tiny")
    client = _client(http_worker, tenant[2])

    with pytest.raises(openai.AuthenticationError):
        _client(http_worker, "not-a-key-" + "x" * 30).completions.create(model="tiny", prompt=PROMPT)
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="no-such-adapter", prompt=PROMPT)
    with pytest.raises(openai.NotFoundError) as hidden:
        client.completions.create(model=private, prompt=PROMPT)
    assert hidden.value.body["message"].replace(private, "X") == missing.value.body["message"].replace(
        "no-such-adapter", "X"
    )
    assert _client(http_worker, owner_key).completions.create(model=private, prompt=PROMPT, max_tokens=2)
    for field, value in (
        ("n", 2),
        ("tools", [{"type": "function"}]),
        ("response_format", {"type": "json_object"}),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], extra_body={field: value}
            )
        assert refused.value.body["param"] == field
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="tiny", prompt=PROMPT, temperature=-1)
    assert bad.value.body["param"] == "temperature" and bad.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="tiny", prompt=PROMPT, logit_bias={"1": 5})
    assert bad.value.body["param"] == "logit_bias"


def test_duplicate_request_id_is_a_conflict(system, http_worker):
    _, _, key = system.new_tenant()
    request_id = f"req-{uuid.uuid4().hex}"
    client = _client(http_worker, key)
    client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=3, extra_headers={"X-Request-Id": request_id}
    )
    with pytest.raises(openai.ConflictError) as conflict:
        client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=3, extra_headers={"X-Request-Id": request_id}
        )
    assert request_id in conflict.value.body["message"]
    with (
        Client(http_worker.grpc_target, key) as grpc_client,
        pytest.raises(errors.OpenLoRAError) as grpc_refusal,
    ):
        grpc_client.complete(PROMPT, max_tokens=3, request_id=request_id)
    # the same id is used for gRPC too: one idempotency space
    assert grpc_refusal.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert grpc_refusal.value.details.startswith(f"request_id {request_id!r} is already used")


def test_overload_is_429_with_retry_after_and_draining_is_503(system, tmp_path, tenant):
    from data_plane.server.config import EngineSettings
    from tests.openai.conftest import start_http_worker

    small = start_http_worker(
        system,
        tmp_path,
        engine=EngineSettings(num_kv_blocks=64, max_num_seqs=1, max_lora_rank=16),
        max_waiting=1,
    )
    try:
        client = _client(small, tenant[2])

        def call():
            try:
                return client.completions.create(model="tiny", prompt=PROMPT, max_tokens=150).choices[0].text
            except openai.RateLimitError as error:
                return error

        with ThreadPoolExecutor(4) as pool:  # one runs, one waits, the rest find the queue full
            outcomes = list(pool.map(lambda _: call(), range(4)))
        refused = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
        assert refused and len(refused) < len(outcomes), outcomes
        assert refused[0].status_code == 429 and refused[0].response.headers["retry-after"] == "1"
        assert refused[0].body["type"] == "rate_limit_error"

        small.worker.state.draining = True
        with pytest.raises(openai.InternalServerError) as draining:
            _client(small, tenant[2]).completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
        assert draining.value.status_code == 503
        assert draining.value.response.headers["retry-after"] == "1"
    finally:
        system.loop.run(small.worker.stop(1.0))


def test_a_model_without_a_chat_template_refuses_chat_and_serves_completions(system, tmp_path, tenant):
    from tests.openai.conftest import start_http_worker

    plain = start_http_worker(system, tmp_path)
    try:
        client = _client(plain, tenant[2])
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
        assert "chat template" in refused.value.body["message"]
        assert client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3).choices[0].text
    finally:
        system.loop.run(plain.worker.stop(1.0))


def test_a_body_over_the_limit_is_413_and_no_key_is_401(http_worker, tenant):
    from data_plane.server.openai_http.schemas import MAX_BODY_BYTES

    headers = {"Authorization": f"Bearer {tenant[2]}", "Content-Type": "application/json"}
    with httpx.Client(base_url=http_worker.base_url, timeout=30) as http:
        big = http.post("/completions", headers=headers, content=b" " * (MAX_BODY_BYTES + 1))
        assert big.status_code == 413 and big.json()["error"]["type"] == "invalid_request_error"
        anonymous = http.post("/completions", json={"model": "tiny", "prompt": "x"})
        assert anonymous.status_code == 401 and "authorization" in anonymous.json()["error"]["message"]
        assert grpc.StatusCode.UNAUTHENTICATED.name.lower() == anonymous.json()["error"]["code"]


def test_merge_options_in_extra_body_equal_the_grpc_request_with_them(http_worker, tenant):
    from openlora.v1 import inference_pb2, inference_pb2_grpc

    key = tenant[2]
    request = inference_pb2.GenerateRequest(
        prompt=PROMPT,
        mix=[
            inference_pb2.AdapterWeight(adapter="ad0", weight=0.6),
            inference_pb2.AdapterWeight(adapter="ad1", weight=0.4),
        ],
        mix_method=inference_pb2.MIX_METHOD_TIES,
        density=0.5,
        majority_sign_method=inference_pb2.MAJORITY_SIGN_METHOD_FREQUENCY,
        sampling=inference_pb2.SamplingParams(max_tokens=8),
    )
    with grpc.insecure_channel(http_worker.grpc_target) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        text = "".join(r.text for r in stub.Generate(request, metadata=(("authorization", f"Bearer {key}"),)))
    extra = {
        "mix": {"ad0": 0.6, "ad1": 0.4},
        "mix_method": "ties",
        "density": 0.5,
        "majority_sign_method": "frequency",
    }
    completion = _client(http_worker, key).completions.create(
        model="tiny", prompt=PROMPT, max_tokens=8, extra_body=extra
    )
    assert completion.choices[0].text == text
    with pytest.raises(openai.BadRequestError) as refused:
        _client(http_worker, key).completions.create(
            model="tiny", prompt=PROMPT, extra_body={**extra, "majority_sign_method": "loudest"}
        )
    assert refused.value.body["param"] == "majority_sign_method"


@pytest.mark.parametrize("name", ["bad\x00name", "x" * 129, "org/model", "é", "gpt-4o:latest"])
def test_a_name_no_adapter_can_have_is_an_unknown_model_naming_its_param_and_never_reaches_authorize(
    http_worker, tenant, name
):
    """A name no adapter can spell (a Hugging Face id, an OpenAI tag, a letter outside ASCII) is an unknown
    model like any other: 404 naming the body's field, the message of any unknown name (it was a 400 about
    the name's characters; before that, param null with the control plane's refusal passed on), after the
    key is checked (an unknown key is still 401)."""
    client = _client(http_worker, tenant[2])
    with pytest.raises(openai.NotFoundError) as unknown:
        client.completions.create(model="no-such-adapter", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.NotFoundError) as refused:
        client.completions.create(model=name, prompt=PROMPT, max_tokens=2)
    assert refused.value.body["param"] == "model"
    assert refused.value.body["message"].replace(repr(name), "X") == unknown.value.body["message"].replace(
        repr("no-such-adapter"), "X"
    )
    with pytest.raises(openai.NotFoundError) as refused:
        client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=2, extra_body={"mix": [{"adapter": name, "weight": 1.0}]}
        )
    assert refused.value.body["param"] == "mix[0].adapter"
    with pytest.raises(openai.AuthenticationError):
        _client(http_worker, "not-a-key-" + "x" * 30).completions.create(model=name, prompt=PROMPT)


def test_a_strangers_body_is_never_read(http_worker):
    """The key is checked before the body: a request with an unknown key whose body never arrives is
    answered 401 at once (the body used to be read, and parsed on the event loop the gRPC server shares,
    before the key was known: 4 MiB of `{}` from anyone held every tenant's calls for seconds)."""
    headers = (
        "Authorization: Bearer olk_not_a_key\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n"
    )
    # and of the body only its start: the server must not wait for the rest
    answer = _raw_completion(http_worker, headers, b'{"model": "tiny", "prompt": [')
    assert answer.startswith("HTTP/1.1 401"), answer[:200]


def _raw_completion(http_worker, headers: str, body: bytes) -> str:
    """POST /completions with exactly these header lines (each ending in CRLF) and body bytes, as no
    client library would send them; the answer up to the server's closing the connection."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(http_worker.base_url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(f"POST {url.path}/completions HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode() + body)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    return answer.decode(errors="replace")


def test_bodies_are_parsed_off_the_event_loop(http_worker, tenant, monkeypatch):
    import asyncio

    from data_plane.server.openai_http import app as http_app

    parsed_on_loop = []
    real = http_app.parse_completion

    def recording(*args):
        try:
            asyncio.get_running_loop()
            parsed_on_loop.append(True)
        except RuntimeError:
            parsed_on_loop.append(False)
        return real(*args)

    monkeypatch.setattr(http_app, "parse_completion", recording)
    client = _client(http_worker, tenant[2])
    assert client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2).choices[0].text is not None
    assert parsed_on_loop == [False]


@pytest.mark.parametrize(
    ("headers", "words"),
    [
        (
            "Authorization: Bearer {key}\r\nAuthorization: Bearer olk_other\r\nContent-Length: 2\r\n",
            "Authorization",
        ),
        ("Authorization: Bearer {key}\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n", "not both"),
    ],
)
def test_a_request_with_two_keys_or_two_body_framings_is_refused(http_worker, tenant, headers, words):
    """The first of two Authorization headers was used silently; a body framed by both Content-Length and
    Transfer-Encoding was read by the chunks (a proxy in front may read the length: request smuggling)."""
    answer = _raw_completion(http_worker, headers.format(key=tenant[2]), b"{}")
    assert answer.startswith("HTTP/1.1 400"), answer[:200]
    assert words in answer


def test_an_absolute_form_request_target_is_served_as_its_path(http_worker, tenant):
    """A client sent through a proxy URL, or one that just writes it so, names the whole URL in the request
    line (`GET http://host:port/v1/models HTTP/1.1`); HTTP/1.1 servers must accept that form, and the API
    answered 404 to it. Its path and query are served as in origin form; the scheme is matched in any
    case, and an authority with no path stands for "/"."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(http_worker.base_url)
    _, _, secret = tenant

    def answer(target: str) -> str:
        with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
            sock.sendall(
                f"GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
        return data.decode(errors="replace")

    for scheme, path in (("http", "/models"), ("HTTP", "/models?limit=1")):
        origin = answer(f"{url.path}{path}")
        absolute = answer(f"{scheme}://{url.netloc}{url.path}{path}")
        assert origin.startswith("HTTP/1.1 200"), origin[:300]
        assert absolute.startswith("HTTP/1.1 200"), (path, absolute[:300])
        assert absolute.split("\r\n\r\n", 1)[1] == origin.split("\r\n\r\n", 1)[1]
    assert answer(f"http://{url.netloc}").startswith("HTTP/1.1 404")  # "/": no route there, as in origin form
    assert answer("/").startswith("HTTP/1.1 404")
