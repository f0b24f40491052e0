"""`GET /v1/models` through the official `openai` client: the base model and every adapter and saved mix
the key may use, as the control plane lists them (WorkerService.ListModels), in OpenAI's pages."""

from __future__ import annotations

import httpx
import openai
import pytest

from openlora.admin_client import AdminClient

BASE = "tiny"


def _client(http_worker, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=http_worker.base_url, api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def tenants(system):
    """Tenant A: private adapter a-own and saved mix a-mix (of a-own and B's public b-open); tenant B:
    public b-open, private b-secret and saved mix b-mix. ((A's name, key id, key), (B's ...))."""
    a = system.new_tenant(admin=True)
    b = system.new_tenant(admin=True)
    adapters = system.model_dir / "adapters"
    system.admin.push(adapters / "ad0", "b-open", b[0], BASE, public=True)
    system.admin.push(adapters / "ad1", "b-secret", b[0], BASE)
    system.admin.push(adapters / "ad2", "a-own", a[0], BASE)
    with AdminClient(system.control_plane.target, b[2]) as admin:
        admin.create_mix("b-mix", [("b-secret", 1.0)])
    with AdminClient(system.control_plane.target, a[2]) as admin:
        admin.create_mix("a-mix", [("a-own", 0.5), ("b-open", 0.5)])
    return a, b


def test_a_key_sees_the_base_its_adapter_and_mix_and_public_adapters(system, http_worker, tenants):
    (a, _, a_key), (b, _, _) = tenants
    models = {m.id: m for m in _client(http_worker, a_key).models.list(extra_query={"limit": 1000}).data}
    assert models[BASE].owned_by == "openlora"
    assert (models["a-own"].owned_by, models["a-own"].parent) == (a, BASE)
    assert (models["a-mix"].owned_by, models["a-mix"].parent) == (a, BASE)
    assert (models["b-open"].owned_by, models["b-open"].parent) == (b, BASE)
    assert {f"ad{i}" for i in range(8)} <= set(models)  # the fixture's public adapters
    assert all(m.object == "model" and m.created > 0 for m in models.values())


def test_the_base_models_created_is_when_its_config_was_written_not_when_the_worker_started(
    chat_model_dir, http_worker, tenants
):
    """It was the worker's start time, so every restart gave the base model a new `created` while each
    adapter kept its own."""
    (_, _, a_key), _ = tenants
    base = _client(http_worker, a_key).models.retrieve(BASE)
    assert base.created == int((chat_model_dir / "config.json").stat().st_mtime)


def test_another_tenants_private_adapter_and_mix_never_appear(http_worker, tenants):
    (_, _, a_key), (_, _, b_key) = tenants
    a_ids = {m.id for m in _client(http_worker, a_key).models.list(extra_query={"limit": 1000}).data}
    assert not {"b-secret", "b-mix"} & a_ids
    b_ids = {m.id for m in _client(http_worker, b_key).models.list(extra_query={"limit": 1000}).data}
    assert {"b-secret", "b-mix", "b-open"} <= b_ids and not {"a-own", "a-mix"} & b_ids


def test_retrieve_answers_each_listed_model_and_404s_the_rest(http_worker, tenants):
    """`models.retrieve(id)` (GET /v1/models/{id}) answers the listing's object for a model the key may
    use, and OpenAI's 404 `model_not_found` for one it may not (another tenant's private adapter or mix
    looks as absent as a name nobody has); it answered 404 'no route' for every id before."""
    (a, _, a_key), _ = tenants
    client = _client(http_worker, a_key)
    listed = {m.id: m for m in client.models.list(extra_query={"limit": 1000}).data}
    for model_id in (BASE, "a-own", "a-mix", "b-open"):
        assert client.models.retrieve(model_id) == listed[model_id]
    assert client.models.retrieve("a-own").owned_by == a
    for hidden in ("b-secret", "b-mix", "no-such-model", "org/model"):
        with pytest.raises(openai.NotFoundError) as refused:
            client.models.retrieve(hidden)
        assert (refused.value.body["param"], refused.value.body["code"]) == ("model", "model_not_found")
    with pytest.raises(openai.AuthenticationError):
        _client(http_worker, "olk_unknown_key").models.retrieve(BASE)


def test_paging_with_limit_and_after_walks_every_model_exactly_once(http_worker, tenants):
    (_, _, a_key), _ = tenants
    client = _client(http_worker, a_key)
    everything = [m.id for m in client.models.list(extra_query={"limit": 1000}).data]
    assert everything.count(BASE) == 1
    walked, after = [], None
    while True:
        query = {"limit": 3} | ({"after": after} if after else {})
        page = client.models.list(extra_query=query)
        assert 1 <= len(page.data) <= 3
        walked += [m.id for m in page.data]
        if not page.has_more:
            break
        after = page.data[-1].id
    assert walked == everything and len(set(walked)) == len(walked)
    assert walked[0] == BASE and {"a-own", "a-mix", "b-open"} <= set(walked)


@pytest.mark.parametrize("limit", ["\u00b2", "\u0661", "-1", "0", "1e3", ""])
def test_a_limit_that_is_not_ascii_digits_in_range_is_a_400_naming_it(http_worker, tenants, limit):
    (_, _, a_key), _ = tenants
    client = _client(http_worker, a_key)
    with pytest.raises(openai.BadRequestError) as refused:
        client.models.list(extra_query={"limit": limit})
    assert refused.value.body["param"] == "limit"


@pytest.mark.parametrize("query", ["limit=1&limit=2", "after=a&after=b"])
def test_a_query_parameter_given_twice_is_a_400_naming_it(http_worker, tenants, query):
    """As a body's duplicate key is refused: the last of them was served, silently."""
    (_, _, a_key), _ = tenants
    answer = httpx.get(
        f"{http_worker.base_url}/models?{query}", headers={"Authorization": f"Bearer {a_key}"}, timeout=30
    )
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == query.split("=")[0]


@pytest.mark.parametrize(
    ("query", "served"), [("after=%ff", False), ("after=a%c3", False), ("after=%ef%bf%bd", True)]
)
def test_a_query_value_that_is_not_utf8_is_a_400_naming_it(http_worker, tenants, query, served):
    """`?after=%ff` was read as U+FFFD (Starlette decodes with replacement) and listed an empty page; a
    U+FFFD the client spelled in UTF-8 is a value like any other."""
    (_, _, a_key), _ = tenants
    answer = httpx.get(
        f"{http_worker.base_url}/models?{query}", headers={"Authorization": f"Bearer {a_key}"}, timeout=30
    )
    if served:
        assert answer.status_code == 200, answer.text
        return
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "after"
    assert "UTF-8" in answer.json()["error"]["message"]


def test_a_revoked_key_gets_authentication_error(system, http_worker):
    _, key_id, key = system.new_tenant()
    client = _client(http_worker, key)
    assert client.models.list().data[0].id == BASE
    system.admin.revoke_key(key_id)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_the_api_listener_serves_no_metrics_unless_asked(http_worker, tenants):
    """GET /metrics needs no key and names the adapters in use, private ones too: the public API listener
    does not serve it by default (the metrics port does; `--http-metrics` opts in)."""
    (_, _, a_key), _ = tenants
    client = _client(http_worker, a_key)
    client.completions.create(model="a-own", prompt="hello", max_tokens=2)
    response = httpx.get(http_worker.base_url.removesuffix("/v1") + "/metrics", timeout=10)
    assert response.status_code == 404 and "a-own" not in response.text


def test_after_a_model_that_is_gone_the_listing_goes_on(system, http_worker, tenants):
    """`after` is a keyset cursor: a model deleted (or hidden by its owner) between two pages answered an
    empty last page (has_more false), and another tenant could cut a key's listing short that way."""
    (_, _, a_key), _ = tenants
    client = _client(http_worker, a_key)
    everything = [m.id for m in client.models.list(extra_query={"limit": 1000}).data]
    first = client.models.list(extra_query={"limit": 3})
    assert [m.id for m in first.data] == everything[:3] == [BASE, "a-mix", "a-own"]
    with AdminClient(system.control_plane.target, a_key) as admin:
        admin.delete_mix("a-mix")
        admin.delete_adapter("a-own")
    rest = client.models.list(extra_query={"limit": 1000, "after": "a-own"})
    assert [m.id for m in rest.data] == everything[3:]
    never = client.models.list(
        extra_query={"limit": 1000, "after": "a-zzz"}
    )  # never existed: sorts before ad0
    assert [m.id for m in never.data] == [i for i in everything[3:] if i > "a-zzz"]
    with pytest.raises(openai.BadRequestError) as refused:
        client.models.list(extra_query={"after": ""})
    assert refused.value.body["param"] == "after"
