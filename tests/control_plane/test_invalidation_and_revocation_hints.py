"""Hints for content shared between tenants, and for revoked keys.

An artifact is content-addressed: two tenants' adapters with the same files share one sha256. Deleting
or replacing one of them must not tell workers to drop content the other still uses; revoking a key
reaches workers as a "revoke" hint naming the key's id, never its plaintext."""

from __future__ import annotations

import uuid

import redis

from openlora.cache_scope import cache_scope
from openlora.hints import HINTS_STREAM, Hint

BASE = "tiny-llama"


def _entries(redis_url: str) -> list[dict[bytes, bytes]]:
    client = redis.Redis.from_url(redis_url)
    try:
        return [fields for _, fields in reversed(client.xrevrange(HINTS_STREAM, count=2000))]
    finally:
        client.close()


def _hints(redis_url: str, **match: str) -> list[Hint]:
    hints = [Hint.from_fields(fields) for fields in _entries(redis_url)]
    return [h for h in hints if all(getattr(h, k) == v for k, v in match.items())]


_TENANT_IDS: dict[str, str] = {}


def _two_tenants(cp) -> tuple[str, str]:
    names = (f"sa-{uuid.uuid4().hex[:8]}", f"sb-{uuid.uuid4().hex[:8]}")
    with cp.admin() as admin:
        for name in names:
            _TENANT_IDS[name] = admin.create_tenant(name).id
    return names


def _scope(tenant: str) -> str:
    """The cache scope of `tenant`'s private adapters (a tenant `_two_tenants` made)."""
    return cache_scope(_TENANT_IDS[tenant], private=True)


def test_deleting_one_of_two_adapters_sharing_content_keeps_the_content(cp, redis_url, adapters_root) -> None:
    first_tenant, second_tenant = _two_tenants(cp)
    with cp.admin() as admin:
        first = admin.upload_adapter(adapters_root / "a", "shared", BASE, tenant=first_tenant).adapter
        second = admin.upload_adapter(adapters_root / "a", "shared", BASE, tenant=second_tenant).adapter
        assert first.sha256 == second.sha256 and first.id != second.id
        admin.delete_adapter("shared", tenant=first_tenant)
        # The other tenant still serves that sha256: only the first tenant's own cache key of it goes
        # (kept, it made the first tenant's next upload of the same bytes warm: someone holds them).
        (hint,) = _hints(redis_url, adapter_id=first.id)
        assert (hint.kind, hint.sha256, hint.key_only) == ("invalidate", first.sha256, True)
        assert hint.cache_scope == _scope(first_tenant)
        admin.delete_adapter("shared", tenant=second_tenant)
        # The last user is gone: now the content goes too, in every scope.
        assert [(h.kind, h.sha256, h.key_only) for h in _hints(redis_url, adapter_id=second.id)] == [
            ("invalidate", second.sha256, False)
        ]


def test_replacing_content_another_tenant_uses_invalidates_only_the_adapter(
    cp, redis_url, adapters_root
) -> None:
    first_tenant, second_tenant = _two_tenants(cp)
    with cp.admin() as admin:
        old = admin.upload_adapter(adapters_root / "a", "swap", BASE, tenant=first_tenant).adapter
        admin.upload_adapter(adapters_root / "a", "keep", BASE, tenant=second_tenant)
        admin.upload_adapter(adapters_root / "b", "swap", BASE, tenant=first_tenant)
    # Only the first tenant's own cache key of the replaced content goes, never the other tenant's.
    (hint,) = _hints(redis_url, adapter_id=old.id)
    assert (hint.kind, hint.sha256, hint.key_only) == ("invalidate", old.sha256, True)
    assert hint.cache_scope == _scope(first_tenant)


def test_making_a_public_adapter_private_invalidates_it_at_once(cp, redis_url, adapters_root) -> None:
    """The same files uploaded again as private (or with another royalty) change who may use it: workers
    are told at once (they served other tenants on their cached answers for a TTL before); an upload that
    changes nothing publishes nothing."""
    (tenant, _) = _two_tenants(cp)
    with cp.admin() as admin:
        public = admin.upload_adapter(adapters_root / "a", "flip", BASE, tenant=tenant, public=True).adapter
        admin.upload_adapter(adapters_root / "a", "flip", BASE, tenant=tenant, public=True)
        assert _hints(redis_url, adapter_id=public.id) == []
        admin.upload_adapter(adapters_root / "a", "flip", BASE, tenant=tenant, public=False)
    assert [(h.kind, h.sha256) for h in _hints(redis_url, adapter_id=public.id)] == [("invalidate", "")]


def test_revoking_a_key_publishes_its_id_and_never_its_plaintext(cp, redis_url) -> None:
    (tenant, _) = _two_tenants(cp)
    with cp.admin() as admin:
        created = admin.create_api_key(tenant)
        admin.revoke_api_key(created.key.id)
    assert [h.kind for h in _hints(redis_url, api_key_id=created.key.id)] == ["revoke"]
    secret = created.secret.encode()
    assert not any(secret in value for fields in _entries(redis_url) for value in fields.values())


def _run_at_once_each_seeing_the_other_unwritten(monkeypatch, calls) -> None:
    """Runs `calls` (callables) on threads of their own, each of whose `registry.key_is_served` waits until
    both have reached it (each has written its own row: the interleaving in which, without a lock, each
    sees the other's row as it was)."""
    import contextlib
    import threading

    from control_plane.registry import service as registry

    barrier = threading.Barrier(2)
    key_is_served = registry.key_is_served

    def after_both(session, key):
        with contextlib.suppress(threading.BrokenBarrierError):  # a lock keeps one out: it waits 3 s
            barrier.wait(timeout=3)
        return key_is_served(session, key)

    monkeypatch.setattr(registry, "key_is_served", after_both)
    threads = [threading.Thread(target=call) for call in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)


def test_concurrent_deletes_of_a_tenants_two_copies_drop_its_cache_key(
    cp, redis_url, adapters_root, monkeypatch
) -> None:
    """Two deletes at once of a tenant's two adapters of the same content (another tenant holds it too):
    each saw the other still READY (only its own row was locked), so neither named the tenant's cache key
    and its copy stayed warm on workers, the leak `key_only` closes."""
    deleter, holder = _two_tenants(cp)
    with cp.admin() as admin:
        x = admin.upload_adapter(adapters_root / "a", "cx", BASE, tenant=deleter).adapter
        y = admin.upload_adapter(adapters_root / "a", "cy", BASE, tenant=deleter).adapter
        admin.upload_adapter(adapters_root / "a", "held", BASE, tenant=holder)

    def delete(name):
        with cp.admin() as admin:
            admin.delete_adapter(name, tenant=deleter)

    _run_at_once_each_seeing_the_other_unwritten(monkeypatch, [lambda: delete("cx"), lambda: delete("cy")])
    hints = [h for a in (x, y) for h in _hints(redis_url, adapter_id=a.id)]
    assert any(h.key_only for h in hints), "the deleter's cache key was never dropped"


def test_concurrent_replacements_of_a_tenants_two_copies_drop_its_cache_key(
    cp, redis_url, adapters_root, adapter_copy, monkeypatch
) -> None:
    """The delete race above, by replacement: two uploads at once replace a tenant's two adapters of one
    content (another tenant holds it too) with other contents; each saw the other still READY under the
    old content, so neither dropped the tenant's cache key of it."""
    tenant, holder = _two_tenants(cp)
    with cp.admin() as admin:
        x = admin.upload_adapter(adapters_root / "a", "rx", BASE, tenant=tenant).adapter
        y = admin.upload_adapter(adapters_root / "a", "ry", BASE, tenant=tenant).adapter
        admin.upload_adapter(adapters_root / "a", "kept", BASE, tenant=holder)
    other = adapter_copy("b")
    config = other / "adapter_config.json"
    config.write_text(config.read_text().replace('"lora_alpha": 8', '"lora_alpha": 9'))

    def replace(name, directory):
        with cp.admin() as admin:
            admin.upload_adapter(directory, name, BASE, tenant=tenant)

    _run_at_once_each_seeing_the_other_unwritten(
        monkeypatch, [lambda: replace("rx", adapters_root / "b"), lambda: replace("ry", other)]
    )
    hints = [h for a in (x, y) for h in _hints(redis_url, adapter_id=a.id)]
    assert any(h.key_only for h in hints), "the tenant's cache key of the replaced content was never dropped"
