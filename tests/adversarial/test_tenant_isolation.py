"""Promise: no private adapter of one tenant is visible to another, through any RPC."""

from __future__ import annotations

import shutil

import grpc
import pytest

from openlora.v1 import admin_pb2, inference_pb2, worker_pb2

from .conftest import ADMIN_KEY, BASE_MODEL, WORKER_TOKEN, bearer, status_of

NOT_FOUND = grpc.StatusCode.NOT_FOUND


@pytest.fixture(scope="module")
def victim(attacker):
    """Tenant A with a private adapter `secret` (and a public one `shared`)."""
    a = attacker.new_tenant()
    a.secret_sha256 = attacker.push(a, "secret", adapter="ad1")
    attacker.push(a, "shared", adapter="ad2", public=True)
    return a


@pytest.fixture(scope="module")
def intruder(attacker):
    return attacker.new_tenant()


def test_get_adapter_of_another_tenants_private_adapter_is_not_found(attacker, victim, intruder):
    get = attacker.admin.GetAdapter
    assert (
        status_of(
            lambda: get(admin_pb2.GetAdapterRequest(name="secret"), metadata=bearer(intruder.admin_key))
        )
        == NOT_FOUND
    )
    # Naming the owner is acting for another tenant: refused whether or not the adapter exists.
    for name in ("secret", "never-existed"):
        request = admin_pb2.GetAdapterRequest(name=name, tenant=victim.name)
        assert status_of(lambda r=request: get(r, metadata=bearer(intruder.admin_key))) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
    assert get(admin_pb2.GetAdapterRequest(name="shared"), metadata=bearer(intruder.admin_key)).adapter.name


def _all_pages(attacker, key: str, page_size: int, token: str = "") -> list[admin_pb2.Adapter]:
    found = []
    while True:
        page = attacker.admin.ListAdapters(
            admin_pb2.ListAdaptersRequest(page_size=page_size, page_token=token, include_public=True),
            metadata=bearer(key),
        )
        found += page.adapters
        token = page.next_page_token
        if not token:
            return found


def test_list_adapters_never_lists_another_tenants_private_adapter(attacker, victim, intruder):
    seen = _all_pages(attacker, intruder.admin_key, page_size=1)
    assert ("secret", victim.name) not in {(a.name, a.tenant) for a in seen}
    assert ("shared", victim.name) in {(a.name, a.tenant) for a in seen}
    assert not any(a.sha256 == victim.secret_sha256 and a.tenant == victim.name for a in seen)


def test_a_page_token_of_another_tenant_reveals_nothing_private(attacker, victim, intruder):
    page = attacker.admin.ListAdapters(
        admin_pb2.ListAdaptersRequest(page_size=1), metadata=bearer(victim.admin_key)
    )
    assert page.next_page_token  # victim owns two adapters
    seen = _all_pages(attacker, intruder.admin_key, page_size=5, token=page.next_page_token)
    assert all(a.tenant != victim.name or a.visibility == admin_pb2.VISIBILITY_PUBLIC for a in seen)


def test_delete_of_another_tenants_adapter_is_not_found_and_changes_nothing(attacker, victim, intruder):
    for name in ("secret", "shared"):
        request = admin_pb2.DeleteAdapterRequest(name=name)
        assert (
            status_of(lambda r=request: attacker.admin.DeleteAdapter(r, metadata=bearer(intruder.admin_key)))
            == NOT_FOUND
        )
    mine = attacker.admin.GetAdapter(
        admin_pb2.GetAdapterRequest(name="secret"), metadata=bearer(victim.admin_key)
    )
    assert mine.adapter.status == admin_pb2.ADAPTER_STATUS_READY
    assert mine.adapter.sha256 == victim.secret_sha256


def test_uploading_the_same_name_as_another_tenant_makes_a_separate_adapter(attacker, victim, intruder):
    sha256 = attacker.push(intruder, "secret", adapter="ad3")
    assert sha256 != victim.secret_sha256
    theirs = attacker.admin.GetAdapter(
        admin_pb2.GetAdapterRequest(name="secret"), metadata=bearer(victim.admin_key)
    )
    assert (theirs.adapter.tenant, theirs.adapter.sha256) == (victim.name, victim.secret_sha256)
    mine = attacker.admin.GetAdapter(
        admin_pb2.GetAdapterRequest(name="secret"), metadata=bearer(intruder.admin_key)
    )
    assert (mine.adapter.tenant, mine.adapter.sha256) == (intruder.name, sha256)
    attacker.admin.DeleteAdapter(
        admin_pb2.DeleteAdapterRequest(name="secret"), metadata=bearer(intruder.admin_key)
    )


def test_authorize_refuses_another_tenants_private_adapter(attacker, victim, intruder):
    request = worker_pb2.AuthorizeRequest(
        api_key=intruder.infer_key, adapters=["secret"], base_model=BASE_MODEL
    )
    assert status_of(lambda: attacker.workers.Authorize(request, metadata=bearer(WORKER_TOKEN))) == NOT_FOUND
    request = worker_pb2.AuthorizeRequest(
        api_key=victim.infer_key, adapters=["secret"], base_model=BASE_MODEL
    )
    assert (
        attacker.workers.Authorize(request, metadata=bearer(WORKER_TOKEN)).adapters[0].sha256
        == victim.secret_sha256
    )


def test_generate_with_another_tenants_private_adapter_is_not_found(attacker, victim, intruder):
    assert status_of(lambda: attacker.generate(intruder.infer_key, adapter="secret")) == NOT_FOUND
    mix = [
        inference_pb2.AdapterWeight(adapter="ad0", weight=0.5),
        inference_pb2.AdapterWeight(adapter="secret", weight=0.5),
    ]
    assert status_of(lambda: attacker.generate(intruder.infer_key, mix=mix)) == NOT_FOUND
    # The owner, asking right after, is served (the refusal did not poison the worker's caches).
    assert attacker.generate(victim.infer_key, adapter="secret")[-1].usage.completion_tokens == 2


def _tier(responses: list[inference_pb2.GenerateResponse]) -> int:
    return responses[-1].timing.cache_tier


def test_identical_private_content_is_never_found_warm_by_another_tenant(attacker, tmp_path):
    """Promise: uploading the same bytes as another tenant's private adapter tells nothing. Workers keep
    content apart per cache scope (its owner when private), so the copier's first call comes from the
    control plane, neither from the owner's device slot nor from the owner's copy on the worker's disk;
    nor does a copy published as public find it. A public adapter's content stays shared."""
    content = tmp_path / "unique"
    shutil.copytree(attacker.system.model_dir / "adapters" / "ad3", content)
    config = content / "adapter_config.json"
    text = config.read_text()
    assert '"lora_alpha": 16' in text
    config.write_text(text.replace('"lora_alpha": 16', '"lora_alpha": 23'))  # content no one else has
    owner, copier, publisher, reader = (attacker.new_tenant() for _ in range(4))
    sha = attacker.push(owner, "mine", adapter=content)
    assert _tier(attacker.generate(owner.infer_key, adapter="mine")) == inference_pb2.CACHE_TIER_REMOTE
    assert _tier(attacker.generate(owner.infer_key, adapter="mine")) == inference_pb2.CACHE_TIER_DEVICE

    assert attacker.push(copier, "copy", adapter=content) == sha
    assert _tier(attacker.generate(copier.infer_key, adapter="copy")) == inference_pb2.CACHE_TIER_REMOTE
    assert _tier(attacker.generate(copier.infer_key, adapter="copy")) == inference_pb2.CACHE_TIER_DEVICE

    assert attacker.push(publisher, "open", adapter=content, public=True) == sha
    assert _tier(attacker.generate(publisher.infer_key, adapter="open")) == inference_pb2.CACHE_TIER_REMOTE
    # Public content is one cache entry for every caller: another tenant's call of it is warm.
    assert _tier(attacker.generate(reader.infer_key, adapter="open")) in (
        inference_pb2.CACHE_TIER_DEVICE,
        inference_pb2.CACHE_TIER_HOST,
    )
    # The owner's copy was never disturbed by the others.
    assert _tier(attacker.generate(owner.infer_key, adapter="mine")) == inference_pb2.CACHE_TIER_DEVICE


def test_a_merge_of_private_content_is_never_found_built_by_another_tenant(attacker, tmp_path):
    """The same TIES mix over identical private content, asked by two tenants: the second builds its own
    from its own copies (fetched from the control plane) instead of finding the first one's merge."""
    contents = []
    for i, source in enumerate(("ad4", "ad5")):
        content = tmp_path / f"unique{i}"
        shutil.copytree(attacker.system.model_dir / "adapters" / source, content)
        config = content / "adapter_config.json"
        config.write_text(config.read_text().replace('"lora_alpha": 16', f'"lora_alpha": {31 + i}'))
        contents.append(content)
    tenants = [attacker.new_tenant() for _ in range(2)]
    for tenant in tenants:
        for i, content in enumerate(contents):
            attacker.push(tenant, f"part{i}", adapter=content)
    mix = [inference_pb2.AdapterWeight(adapter=f"part{i}", weight=0.5) for i in range(2)]
    for tenant in tenants:
        first = attacker.generate(tenant.infer_key, mix=mix, mix_method=inference_pb2.MIX_METHOD_TIES)
        assert _tier(first) == inference_pb2.CACHE_TIER_REMOTE
        again = attacker.generate(tenant.infer_key, mix=mix, mix_method=inference_pb2.MIX_METHOD_TIES)
        assert _tier(again) in (inference_pb2.CACHE_TIER_DEVICE, inference_pb2.CACHE_TIER_HOST)


def test_a_linear_mix_of_public_adapters_is_never_found_warm_by_another_tenant(attacker):
    """A linear mix is loaded into one slot under a key of its members and weights. Public members have
    the same keys for everyone, so a shared mix key let a tenant asking for another's recipe (members
    and weights) find it on the device at once, and learn that someone had used exactly that recipe, as
    merges did before they were keyed by the asking tenant."""
    mix = [
        inference_pb2.AdapterWeight(adapter="ad6", weight=0.375),
        inference_pb2.AdapterWeight(adapter="ad7", weight=0.625),
    ]
    asker, prober = attacker.new_tenant(), attacker.new_tenant()
    attacker.generate(asker.infer_key, mix=mix)
    assert _tier(attacker.generate(asker.infer_key, mix=mix)) == inference_pb2.CACHE_TIER_DEVICE
    assert _tier(attacker.generate(prober.infer_key, mix=mix)) not in (
        inference_pb2.CACHE_TIER_DEVICE,
        inference_pb2.CACHE_TIER_HOST,
    )


def test_fetch_artifact_refuses_an_api_key(attacker, victim):
    request = worker_pb2.FetchArtifactRequest(sha256=victim.secret_sha256)
    for key in (victim.admin_key, victim.infer_key, ADMIN_KEY):
        assert status_of(lambda k=key: list(attacker.workers.FetchArtifact(request, metadata=bearer(k)))) == (
            grpc.StatusCode.UNAUTHENTICATED
        )


def test_tenant_admin_cannot_read_or_act_for_another_tenant(attacker, victim, intruder):
    m = bearer(intruder.admin_key)
    calls = {
        "GetUsage": lambda: attacker.admin.GetUsage(
            admin_pb2.GetUsageRequest(tenant=victim.name), metadata=m
        ),
        "GetInvoice": lambda: attacker.admin.GetInvoice(
            admin_pb2.GetInvoiceRequest(tenant=victim.name, period="2026-01"), metadata=m
        ),
        "CreateApiKey": lambda: attacker.admin.CreateApiKey(
            admin_pb2.CreateApiKeyRequest(tenant=victim.name, scopes=[admin_pb2.SCOPE_ADMIN]), metadata=m
        ),
        "ListAdapters": lambda: attacker.admin.ListAdapters(
            admin_pb2.ListAdaptersRequest(tenant=victim.name), metadata=m
        ),
        "ListWorkers": lambda: attacker.admin.ListWorkers(admin_pb2.ListWorkersRequest(), metadata=m),
        "CreateTenant": lambda: attacker.admin.CreateTenant(
            admin_pb2.CreateTenantRequest(name="evil"), metadata=m
        ),
    }
    codes = {name: status_of(call) for name, call in calls.items()}
    assert codes == dict.fromkeys(calls, grpc.StatusCode.PERMISSION_DENIED)


def test_tenant_admin_cannot_revoke_another_tenants_key(attacker, victim, intruder):
    request = admin_pb2.RevokeApiKeyRequest(key_id=victim.infer_key_id)
    assert (
        status_of(lambda: attacker.admin.RevokeApiKey(request, metadata=bearer(intruder.admin_key)))
        == NOT_FOUND
    )
    assert attacker.generate(victim.infer_key)[-1].usage.completion_tokens == 2


def test_the_base_models_name_is_no_adapters_or_mixes_and_means_the_base_model(attacker, intruder):
    """A public adapter named like the base model was served to gRPC callers who named the base model as
    `adapter` (and collected its royalty from them), while HTTP's `model` of that name is the base model,
    and /v1/models never listed it. The name is refused for adapters and mixes, and gRPC reads it as the
    base model, as HTTP does."""
    with pytest.raises(grpc.RpcError) as refused:
        attacker.push(intruder, BASE_MODEL, public=True)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith(f"name: {BASE_MODEL!r} is the name of a base model")
    attacker.push(intruder, "own", adapter="ad0")
    with pytest.raises(grpc.RpcError) as refused:
        attacker.admin.CreateMix(
            admin_pb2.CreateMixRequest(
                name=BASE_MODEL, members=[inference_pb2.AdapterWeight(adapter="own", weight=1.0)]
            ),
            metadata=bearer(intruder.admin_key),
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith("name: ")

    def tokens(**fields) -> list[int]:
        sampling = inference_pb2.SamplingParams(max_tokens=6)
        return [
            t for r in attacker.generate(intruder.infer_key, sampling=sampling, **fields) for t in r.token_ids
        ]

    assert tokens(adapter=BASE_MODEL) == tokens() != tokens(adapter="own")
