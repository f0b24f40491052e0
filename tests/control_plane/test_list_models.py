"""WorkerService.ListModels: the adapters and saved mixes a caller's key may name on a base model, one
entry per name, keyset paged; never another tenant's private adapter or mix."""

from __future__ import annotations

import uuid

import grpc
import pytest
import sqlalchemy

from openlora.v1 import worker_pb2

BASE = "tiny-llama"


def _tenant(cp) -> tuple[str, str, str]:
    """(tenant name, admin key secret, admin key id) of a fresh tenant."""
    name = f"lm-{uuid.uuid4().hex[:8]}"
    with cp.admin() as admin:
        admin.create_tenant(name)
        created = admin.create_api_key(name, admin=True)
    return name, created.secret, created.key.id


def _list(cp, api_key: str, page_size: int = 0, page_token: str = "") -> worker_pb2.ListModelsResponse:
    return cp.worker_stub().ListModels(
        worker_pb2.ListModelsRequest(
            api_key=api_key, base_model=BASE, page_size=page_size, page_token=page_token
        ),
        metadata=cp.worker_metadata(),
    )


def _walk(cp, api_key: str, page_size: int) -> list[list[tuple[str, str, str]]]:
    """Every page's (name, kind, owned_by) entries."""
    pages, token = [], ""
    while True:
        response = _list(cp, api_key, page_size, token)
        pages.append([(m.name, m.kind, m.owned_by) for m in response.models])
        token = response.next_page_token
        if not token:
            return pages


@pytest.fixture(scope="module")
def world(cp, adapters_root):
    """Tenant A: private adapters a1, a2 and a mix of them; tenant B: a private adapter, a public one and a mix. (A's name, A's key, B's name, B's key)."""
    a, a_key, _ = _tenant(cp)
    b, b_key, _ = _tenant(cp)
    with cp.admin(a_key) as admin:
        admin.upload_adapter(adapters_root / "a", "a1", BASE)
        admin.upload_adapter(adapters_root / "b", "a2", BASE)
        admin.create_mix("a-blend", [("a1", 0.5), ("a2", 0.5)])
    with cp.admin(b_key) as admin:
        admin.upload_adapter(adapters_root / "a", "b-private", BASE)
        admin.upload_adapter(adapters_root / "b", "b-public", BASE, public=True)
        admin.create_mix("b-blend", [("b-private", 1.0)])
    return a, a_key, b, b_key


def test_a_key_lists_its_adapters_and_mixes_and_others_public_adapters_only(cp, world) -> None:
    a, a_key, b, b_key = world
    listed = [(m.name, m.kind, m.owned_by) for m in _list(cp, a_key).models]
    assert listed == [
        ("a-blend", "mix", a),
        ("a1", "adapter", a),
        ("a2", "adapter", a),
        ("b-public", "adapter", b),
    ]
    assert all(m.created_at.seconds > 0 for m in _list(cp, a_key).models)
    b_listed = [m.name for m in _list(cp, b_key).models]
    assert b_listed == ["b-blend", "b-private", "b-public"]


def test_paging_walks_every_entry_exactly_once(cp, world) -> None:
    _, a_key, _, _ = world
    everything = [e for page in _walk(cp, a_key, 100) for e in page]
    for page_size in (1, 2, 3):
        pages = _walk(cp, a_key, page_size)
        assert all(len(p) <= page_size for p in pages)
        assert [e for page in pages for e in page] == everything


def test_one_entry_per_name_as_authorize_resolves_it(cp, adapters_root) -> None:
    a, a_key, _ = _tenant(cp)
    b, b_key, _ = _tenant(cp)
    with cp.admin(b_key) as admin:
        admin.upload_adapter(adapters_root / "a", "same", BASE, public=True)
        admin.upload_adapter(adapters_root / "b", "shadowed", BASE, public=True)
    with cp.admin(a_key) as admin:
        admin.upload_adapter(adapters_root / "b", "same", BASE)
        admin.upload_adapter(adapters_root / "a", "mine", BASE)
        admin.create_mix("shadowed", [("mine", 1.0)])
    listed = {(m.name, m.kind, m.owned_by) for m in _list(cp, a_key).models}
    # The own adapter over a public one, the own mix over a public adapter of its name.
    assert {("same", "adapter", a), ("shadowed", "mix", a), ("mine", "adapter", a)} <= listed
    assert len([e for e in listed if e[0] in ("same", "shadowed")]) == 2
    assert ("same", "adapter", b) in {(m.name, m.kind, m.owned_by) for m in _list(cp, b_key).models}


def test_a_mix_whose_member_was_deleted_is_not_listed(cp, adapters_root) -> None:
    _, key, _ = _tenant(cp)
    with cp.admin(key) as admin:
        admin.upload_adapter(adapters_root / "a", "ok", BASE)
        admin.create_mix("good", [("ok", 1.0)])
        admin.delete_adapter("ok")
    # Its member is gone: Authorize would refuse the mix, so it is not offered.
    names = [m.name for m in _list(cp, key).models]
    assert "good" not in names and "ok" not in names


def test_an_unknown_or_revoked_key_is_unauthenticated(cp) -> None:
    _, key, key_id = _tenant(cp)
    _list(cp, key)  # answered while the key is live
    with cp.admin() as admin:
        admin.revoke_api_key(key_id)
    for api_key in (key, "olk_not-a-key", ""):
        with pytest.raises(grpc.RpcError) as info:
            _list(cp, api_key)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_key_without_the_infer_scope_is_permission_denied(cp, database_url) -> None:
    _, key, key_id = _tenant(cp)
    engine = sqlalchemy.create_engine(database_url)
    try:
        with engine.begin() as connection:  # no API grants such a key; make one as an old row may be
            connection.execute(
                sqlalchemy.text("UPDATE api_key SET scopes = '{}' WHERE id = :id"), {"id": key_id}
            )
    finally:
        engine.dispose()
    with pytest.raises(grpc.RpcError) as info:
        _list(cp, key)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_malformed_page_token_or_page_size_is_invalid_argument(cp, world) -> None:
    _, a_key, _, _ = world
    for page_size, token in ((0, "not a token"), (5000, "")):
        with pytest.raises(grpc.RpcError) as info:
            _list(cp, a_key, page_size, token)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_wrong_worker_token_is_refused(cp, world) -> None:
    _, a_key, _, _ = world
    with pytest.raises(grpc.RpcError) as info:
        cp.worker_stub().ListModels(
            worker_pb2.ListModelsRequest(api_key=a_key, base_model=BASE),
            metadata=cp.worker_metadata("wrong-token-0123456789"),
        )
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _visible(cp, key: str, name: str) -> str | None:
    """The owner of the adapter `name` resolves to for this key (get_adapter), None when NOT_FOUND; the
    catalog must list the same."""
    listed = {m.name: m.owned_by for m in _list(cp, key).models if m.kind == "adapter"}
    with cp.admin(key) as admin:
        try:
            owner = admin.get_adapter(name).tenant
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND
            owner = None
    assert listed.get(name) == owner
    return owner


def test_a_public_name_stays_its_first_publishers(cp, adapters_root) -> None:
    """A second tenant publishing under a public name took it over (and its callers, at its own royalty)
    once the first publisher deleted its adapter: a public name now reaches only the adapter of the
    tenant that published it first, and another tenant's public upload under it is refused."""
    honest, honest_key, _ = _tenant(cp)
    squatter, squatter_key, _ = _tenant(cp)
    _, victim_key, _ = _tenant(cp)
    name = f"shout-{uuid.uuid4().hex[:6]}"
    with cp.admin(honest_key) as admin:
        admin.upload_adapter(adapters_root / "a", name, BASE, public=True)
    with cp.admin(squatter_key) as admin:
        with pytest.raises(grpc.RpcError) as taken:
            admin.upload_adapter(adapters_root / "b", name, BASE, public=True)
        assert taken.value.code() == grpc.StatusCode.ALREADY_EXISTS and "name" in taken.value.details()
        admin.upload_adapter(adapters_root / "b", name, BASE)  # as its own private adapter: fine
    assert _visible(cp, victim_key, name) == honest
    assert _visible(cp, squatter_key, name) == squatter  # its own name comes first for itself
    with cp.admin(honest_key) as admin:
        admin.delete_adapter(name)
    assert _visible(cp, victim_key, name) is None
    with cp.admin(squatter_key) as admin, pytest.raises(grpc.RpcError) as still_taken:
        admin.upload_adapter(adapters_root / "b", name, BASE, public=True)
    assert still_taken.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with cp.admin(honest_key) as admin:
        admin.upload_adapter(adapters_root / "a", name, BASE, public=True)
    assert _visible(cp, victim_key, name) == honest
    with cp.admin(honest_key) as admin:
        admin.upload_adapter(adapters_root / "a", name, BASE)  # made private: other tenants lose it
    assert _visible(cp, victim_key, name) is None


def test_a_name_of_the_tenants_own_deleted_adapter_is_not_listed(cp, adapters_root) -> None:
    """The catalog listed another tenant's public adapter under that name, which Authorize refuses."""
    _, other_key, _ = _tenant(cp)
    _, key, _ = _tenant(cp)
    name = f"gone-{uuid.uuid4().hex[:6]}"
    with cp.admin(other_key) as admin:
        admin.upload_adapter(adapters_root / "a", name, BASE, public=True)
    with cp.admin(key) as admin:
        admin.upload_adapter(adapters_root / "b", name, BASE)
        admin.delete_adapter(name)
    assert _visible(cp, key, name) is None
