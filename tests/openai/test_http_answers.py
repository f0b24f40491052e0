"""Answers of the HTTP API in the body's own terms: an unknown model or mix member is a 404 naming its
field, a token limit is refused under the name the body used and with the range it accepts, a token's
logprob bytes are its own, and a path or method the API does not serve is answered in OpenAI's error
format."""

from __future__ import annotations

import httpx
import openai
import pytest

from data_plane.tokenizer import Tokenizer
from openlora.client import Client

PROMPT = "the quick brown fox"


def _client(http_worker, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=http_worker.base_url, api_key=key, max_retries=0)


def test_chat_logprob_bytes_are_the_tokens_own_bytes(system, http_worker, tenant):
    """A generated token that holds one byte of a multi-byte character reports that byte (it reported
    the three bytes of U+FFFD, its text decoded alone)."""
    rendered = f"user: {PROMPT}\nassistant:"  # the conftest's template
    with Client(http_worker.grpc_target, tenant[2]) as client:
        token_ids = [
            t
            for r in client.generate_stream(prompt=rendered, adapter="ad1", max_tokens=12)
            for t in r.token_ids
        ]
    chat = _client(http_worker, tenant[2]).chat.completions.create(
        model="ad1", messages=[{"role": "user", "content": PROMPT}], max_completion_tokens=12, logprobs=True
    )
    content = chat.choices[0].logprobs.content
    tokenizer = Tokenizer.from_dir(system.model_dir)
    assert [c.bytes for c in content] == [list(tokenizer.token_bytes(t)) for t in token_ids]
    lone = [c for c in content if c.token == "\ufffd"]
    assert lone and all(len(c.bytes) == 1 and c.bytes[0] >= 0x80 for c in lone)


def test_an_unknown_model_or_mix_member_is_404_naming_its_field(http_worker, tenant):
    client = _client(http_worker, tenant[2])
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    assert missing.value.body["param"] == "model"
    assert missing.value.body["message"] == "model 'nope' not found"
    # OpenAI's own type and code, which clients test for
    assert (missing.value.body["type"], missing.value.body["code"]) == (
        "invalid_request_error",
        "model_not_found",
    )
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=2,
            extra_body={"mix": {"ad0": 0.5, "nope": 0.5}},
        )
    assert missing.value.body["param"] == "mix[1].adapter"
    assert missing.value.body["code"] == "model_not_found"
    assert missing.value.body["message"] == "mix[1].adapter 'nope' not found"
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=2, extra_body={"mix": [{"adapter": "nope", "weight": 1}]}
        )
    assert missing.value.body["param"] == "mix[0].adapter"


def test_a_token_limit_is_refused_by_the_name_the_body_used_with_the_range_it_accepts(http_worker, tenant):
    client = _client(http_worker, tenant[2])
    limit = http_worker.worker.http._app.state.api.service.limits.max_tokens_limit
    messages = [{"role": "user", "content": PROMPT}]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=0)
    assert refused.value.body["param"] == "max_completion_tokens"
    assert f"[1, {limit}]" in refused.value.body["message"]
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="tiny", prompt=PROMPT, extra_body={"max_tokens": "5"})
    assert refused.value.body["param"] == "max_tokens"
    assert f"[1, {limit}]" in refused.value.body["message"]
    assert "2147483647" not in refused.value.body["message"]


def test_a_token_limit_the_prompt_leaves_no_room_for_is_refused_as_openai_does(http_worker, tenant):
    """OpenAI and vLLM answer 400 when prompt and max_tokens together pass the context (it was served up to
    the context); an omitted max_tokens still yields to the context, and gRPC keeps its own contract."""
    client = _client(http_worker, tenant[2])
    max_model_len = http_worker.worker.engine.max_model_len
    prompt = [5] * (max_model_len - 4)  # leaves room for 4 tokens
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="tiny", prompt=prompt, max_tokens=5)
    assert refused.value.body["param"] == "max_tokens"
    assert f"context holds {max_model_len} tokens" in refused.value.body["message"]
    assert "at most 4 can be generated" in refused.value.body["message"]
    fits = client.completions.create(model="tiny", prompt=prompt, max_tokens=4)
    assert fits.usage.completion_tokens <= 4
    defaulted = client.completions.create(model="tiny", prompt=prompt)  # the server's default: 128
    assert defaulted.usage.prompt_tokens + defaulted.usage.completion_tokens <= max_model_len
    long_chat = [{"role": "user", "content": " ".join(["fox"] * (max_model_len // 8))}]
    rendered = f"user: {long_chat[0]['content']}\nassistant:"  # the conftest's template
    tokenizer = Tokenizer.from_dir(http_worker.worker.config.model_dir)
    rendered_len = len(tokenizer.encode(rendered, add_special_tokens=False))
    room = max_model_len - rendered_len
    assert room > 1
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny", messages=long_chat, max_completion_tokens=room + 1)
    assert refused.value.body["param"] == "max_completion_tokens"
    assert f"at most {room} can be generated" in refused.value.body["message"]


@pytest.mark.parametrize(("data", "kind"), [(b"[]", "an array"), (b'"hi"', "a string"), (b"5", "a number")])
def test_a_body_that_is_not_an_object_says_so(http_worker, tenant, data, kind):
    response = httpx.post(
        f"{http_worker.base_url}/completions",
        content=data,
        headers={"Authorization": f"Bearer {tenant[2]}", "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["message"] == f"the body must be a JSON object, got {kind}"


def test_an_unserved_method_or_path_is_answered_as_an_invalid_request(http_worker, tenant):
    headers = {"Authorization": f"Bearer {tenant[2]}"}
    not_allowed = httpx.get(f"{http_worker.base_url}/completions", headers=headers)
    assert not_allowed.status_code == 405
    assert not_allowed.json()["error"]["type"] == "invalid_request_error"
    assert not_allowed.headers["allow"] == "POST"  # RFC 9110: a 405 names the methods the route takes
    # Starlette adds HEAD to GET routes, in a set's order: sorted, so the header is one string every run.
    assert httpx.post(f"{http_worker.base_url}/models", headers=headers).headers["allow"] == "GET, HEAD"
    slash = httpx.post(
        f"{http_worker.base_url}/completions/", json={"model": "tiny", "prompt": PROMPT}, headers=headers
    )
    assert slash.status_code == 404  # not a redirect (307) that a client follows or gives up on
    assert slash.json()["error"]["message"] == "no route /v1/completions/"


def test_a_path_without_v1_says_the_routes_are_under_v1(http_worker, tenant):
    """`OpenAI(base_url="http://host:port")` (no /v1) asks for /completions: the 404 said only 'no route
    /completions', which does not point at the base URL."""
    headers = {"Authorization": f"Bearer {tenant[2]}"}
    for method, path in (("POST", "/completions"), ("POST", "/chat/completions"), ("GET", "/models")):
        response = httpx.request(method, f"{http_worker.base_url.removesuffix('/v1')}{path}", headers=headers)
        assert response.status_code == 404
        assert response.json()["error"]["message"] == (
            f"no route {path}; the API's routes are under /v1 (/v1{path}): end the client's base URL with /v1"
        )
    elsewhere = httpx.get(f"{http_worker.base_url.removesuffix('/v1')}/health", headers=headers)
    assert elsewhere.json()["error"]["message"] == "no route /health"


# Llama 3.1's template writes the date it is given (`date_string`) into the system header.
_DATE_TEMPLATE = (
    "{% if date_string is not defined %}{% set date_string = '26 Jul 2024' %}{% endif %}"
    "{{ 'Today Date: ' + date_string + '\\n' }}"
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def test_template_variables_the_template_cannot_use_are_a_400_naming_them(system, tmp_path):
    """A `chat_template_kwargs` value of a type the template's own code cannot take (a number where it
    joins text) failed the render with a TypeError: a 500 for something the caller sent."""
    import json

    from .conftest import start_http_worker

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for item in system.model_dir.iterdir():
        if item.name != "tokenizer_config.json":
            (model_dir / item.name).symlink_to(item)
    (model_dir / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": _DATE_TEMPLATE, "bos_token": "", "eos_token": ""})
    )
    _, _, key = system.new_tenant()
    running = start_http_worker(system, tmp_path / "worker", model_dir)
    try:
        client = openai.OpenAI(base_url=running.base_url, api_key=key, max_retries=0)
        messages = [{"role": "user", "content": PROMPT}]
        served = client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=2,
            extra_body={"chat_template_kwargs": {"date_string": "1 Jan 2025"}},
        )
        assert served.usage.prompt_tokens > 0
        for value in (5, ["a"], {"a": 1}):
            with pytest.raises(openai.BadRequestError) as refused:
                client.chat.completions.create(
                    model="tiny",
                    messages=messages,
                    max_tokens=2,
                    extra_body={"chat_template_kwargs": {"date_string": value}},
                )
            assert refused.value.body["param"] == "chat_template_kwargs"
            assert refused.value.body["message"].startswith(
                "chat_template_kwargs hold values the model's chat template cannot use: "
            )
    finally:
        system.loop.run(running.worker.stop(1.0))


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
def test_a_compressed_body_is_a_415_naming_its_content_encoding(http_worker, tenant, encoding):
    """A gzip body was read as JSON and refused as "not valid JSON (not UTF-8 text)", which named nothing the
    client had done; the body is now refused unread by its Content-Encoding."""
    import gzip
    import json

    body = json.dumps({"model": "tiny", "prompt": "the quick brown fox", "max_tokens": 2}).encode()
    headers = {"Authorization": f"Bearer {tenant[2]}", "Content-Type": "application/json"}
    compressed = httpx.post(
        f"{http_worker.base_url}/completions",
        content=gzip.compress(body),
        headers={**headers, "Content-Encoding": encoding},
        timeout=30,
    )
    assert compressed.status_code == 415
    error = compressed.json()["error"]
    assert error["type"] == "invalid_request_error" and f"Content-Encoding '{encoding}'" in error["message"]
    plain = httpx.post(
        f"{http_worker.base_url}/completions",
        content=body,
        headers={**headers, "Content-Encoding": "identity"},
        timeout=30,
    )
    assert plain.status_code == 200 and plain.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize(
    "content_type",
    ["application/x-www-form-urlencoded", "text/plain", "text/json", "multipart/form-data; boundary=x", "+json",
     "application/jsonx", "application/+json"],
)  # fmt: skip
@pytest.mark.parametrize("route", ["completions", "chat/completions"])
def test_a_body_that_is_not_json_by_its_content_type_is_a_415(http_worker, tenant, content_type, route):
    """A form (what `curl -d` sends), text or another type was parsed as JSON whatever it said; now it is
    refused unread, naming the header, and nothing is served or billed. JSON types, parameters and case
    aside, and a body with no Content-Type at all, are read as before."""
    import json

    body = {"model": "tiny", "max_tokens": 2}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if "chat" in route else {"prompt": PROMPT})
    headers = {"Authorization": f"Bearer {tenant[2]}"}
    refused = httpx.post(
        f"{http_worker.base_url}/{route}",
        content=json.dumps(body).encode(),
        headers={**headers, "Content-Type": content_type},
        timeout=30,
    )
    assert refused.status_code == 415
    error = refused.json()["error"]
    assert error["type"] == "invalid_request_error" and "Content-Type" in error["message"]
    assert repr(content_type) in error["message"]
    for accepted in ("application/json", "Application/JSON; charset=utf-8", "application/vnd.api+json", None):
        served = httpx.post(
            f"{http_worker.base_url}/{route}",
            content=json.dumps(body).encode(),
            headers={**headers, **({"Content-Type": accepted} if accepted else {})},
            timeout=30,
        )
        assert served.status_code == 200, (accepted, served.text)
        assert served.json()["usage"]["completion_tokens"] == 2


def test_json_media_types_are_told_from_others():
    from data_plane.server.openai_http.app import is_json_media_type

    for value in (
        "application/json",
        "APPLICATION/JSON",
        " application/json ; charset=utf-8",
        "application/ld+json",
    ):
        assert is_json_media_type(value), value
    for value in ("", "json", "text/json", "application/jsonp", "application/+json", "application/x-json-stream",
                  "text/plain; x=application/json", "application", "application/json-seq"):  # fmt: skip
        assert not is_json_media_type(value), value


@pytest.mark.parametrize("request_id", ["a\x01b", "a\tb", "a\x7fb"])
def test_a_request_id_with_a_control_character_is_refused_naming_the_header(http_worker, tenant, request_id):
    """The id is echoed in the response's X-Request-Id and written into log lines: a control character is
    neither header text nor a log line's, so the request is refused before it is served (it was accepted
    and echoed)."""
    response = httpx.post(
        f"{http_worker.base_url}/completions",
        headers={"Authorization": f"Bearer {tenant[2]}", "X-Request-Id": request_id},
        json={"model": "tiny", "prompt": PROMPT, "max_tokens": 2},
        timeout=30,
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "X-Request-Id"
    assert "control characters" in error["message"]
    assert "x-request-id" not in response.headers


def test_a_chat_rendering_past_its_limit_is_refused_in_a_message_that_reads(http_worker, tenant):
    """The refusal's reason follows its field's name, as every field refusal's does (it read "messages the
    rendered chat is longer than ...")."""
    from data_plane.server.openai_http.chat_template import MAX_RENDERED_CHARS

    client = _client(http_worker, tenant[2])
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x" * (MAX_RENDERED_CHARS + 1)}], max_tokens=2
        )
    assert refused.value.body["param"] == "messages"
    assert (
        refused.value.body["message"] == f"messages render a chat longer than {MAX_RENDERED_CHARS} characters"
    )


def test_a_mix_member_named_as_the_base_model_is_the_base_model(http_worker, tenant):
    """A member is resolved as `model` is: the base model's name (which /v1/models lists) is the base, an
    ensemble member, and a mix of deltas refuses it as the base; it was a 404 saying the model it had just
    listed was not found."""
    client = _client(http_worker, tenant[2])
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=2, extra_body={"mix": {"ad0": 0.5, "tiny": 0.5}}
        )
    assert refused.value.body["param"] == "mix[1].adapter"
    assert refused.value.body["message"] == (
        'mix[1].adapter is the base model, which only an ensemble may hold (`mix_method` "ensemble")'
    )
    served = client.completions.create(
        model="tiny",
        prompt=PROMPT,
        max_tokens=6,
        temperature=0,
        extra_body={"mix": {"tiny": 0.5, "ad0": 0.5}, "mix_method": "ensemble"},
    )
    with Client(http_worker.grpc_target, tenant[2]) as grpc_client:
        expected = grpc_client.complete(
            PROMPT, mix=[("", 0.5), ("ad0", 0.5)], mix_method="ensemble", max_tokens=6, temperature=0
        )
    assert served.choices[0].text == expected
