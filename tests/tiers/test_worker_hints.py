"""apply_hint on a real engine and artifact store; the residency heartbeat in the real Redis."""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import pytest
import redis

from data_plane.adapters.hint_actions import apply_hint, publish_residency, residency_key
from data_plane.server.artifact_store import ArtifactStore
from openlora.cache_scope import cache_key, cache_scope
from openlora.hints import Hint
from tests.engine.conftest import greedy, make_engine, run_to_completion


def _store_with(tmp_path, tiny_model, name: str) -> tuple[ArtifactStore, str]:
    ref = tiny_model.ref(name)
    store = ArtifactStore(tmp_path / "artifacts", fetch=None, spec=None, max_rank=64, max_size_bytes=1 << 30)
    shutil.copytree(ref.path, store.path_of(ref.key))
    return store, ref.key


def test_invalidation_hint_evicts_the_adapter_at_once(tiny_model, tmp_path):
    engine = make_engine(tiny_model, host_cache_bytes=64 << 20)
    try:
        store, key = _store_with(tmp_path, tiny_model, "r4_qv")
        engine.add_request(greedy("r", [1, 2], adapters=[tiny_model.ref("r4_qv")], max_tokens=2))
        run_to_completion(engine)
        assert engine.adapter_cache.tier_of(key) == "device"
        asyncio.run(apply_hint(engine, Hint("invalidate", "id", key), store))
        engine.step()
        assert engine.adapter_cache.tier_of(key) == "disk" and not engine.adapter_cache.on_host(key)
    finally:
        engine.shutdown()


def test_prewarm_hint_loads_the_adapter_ahead_of_its_deadline(tiny_model, tmp_path):
    engine = make_engine(tiny_model, host_cache_bytes=64 << 20)
    try:
        store, key = _store_with(tmp_path, tiny_model, "r8_all")
        far = Hint("prewarm", "id", key, tier="host", deadline_at=time.time() + 60)
        asyncio.run(apply_hint(engine, far, store))
        while engine.has_unfinished():
            engine.step()
        assert engine.adapter_cache.tier_of(key) == "host"
        near = Hint("prewarm", "id", key, tier="host", deadline_at=time.time() + 0.5)
        asyncio.run(apply_hint(engine, near, store))
        while engine.has_unfinished():
            engine.step()
        assert engine.adapter_cache.tier_of(key) == "device"
    finally:
        engine.shutdown()


def test_hints_act_on_the_key_of_the_adapters_cache_scope(tiny_model, tmp_path):
    """A private adapter's requests use its scoped key (openlora/cache_scope.py): a prewarm for it loads
    that key, not the bare content (which another tenant's identical upload would use), and an
    invalidate of the content drops it in every scope."""
    engine = make_engine(tiny_model, host_cache_bytes=64 << 20)
    try:
        ref = tiny_model.ref("r8_all")
        scope = cache_scope("some-tenant-id", private=True)
        scoped = cache_key(ref.key, scope)
        store = ArtifactStore(
            tmp_path / "artifacts", fetch=None, spec=None, max_rank=64, max_size_bytes=1 << 30
        )
        shutil.copytree(ref.path, store.path_of(scoped))
        hint = Hint("prewarm", "id", ref.key, tier="host", deadline_at=time.time() + 60, cache_scope=scope)
        assert Hint.from_fields(hint.to_fields()) == hint
        asyncio.run(apply_hint(engine, hint, store))
        while engine.has_unfinished():
            engine.step()
        assert engine.adapter_cache.tier_of(scoped) == "host"
        assert engine.adapter_cache.tier_of(ref.key) == "disk"  # the public key was never loaded
        asyncio.run(apply_hint(engine, Hint("invalidate", "id", ref.key), store))
        engine.step()
        assert not engine.adapter_cache.on_host(scoped)
    finally:
        engine.shutdown()


def test_a_hint_with_a_malformed_cache_scope_is_refused_when_read():
    fields = Hint("prewarm", "id", "a" * 64, tier="host").to_fields()
    for bad in ("x" * 32, "ab", "a" * 33, "../../etc"):
        with pytest.raises(ValueError, match="cache_scope"):
            Hint.from_fields({**fields, "cache_scope": bad})


def test_a_periodic_prewarm_protects_its_adapter_and_a_burst_prewarm_does_not(tiny_model, tmp_path):
    """A burst's adapter is loaded but ranked by value like any other: with memoryless traffic most
    'bursts' are chance, and a protected copy would push out one that is more likely to be used."""
    engine = make_engine(tiny_model, host_cache_bytes=64 << 20)
    try:
        cache = engine.adapter_cache
        store, periodic_key = _store_with(tmp_path, tiny_model, "r8_all")
        burst_ref = tiny_model.ref("r4_qv")
        shutil.copytree(burst_ref.path, store.path_of(burst_ref.key))
        soon = time.time() + 30
        hints = [
            Hint("prewarm", "a", periodic_key, tier="host", deadline_at=soon, reason="periodic"),
            Hint("prewarm", "b", burst_ref.key, tier="host", deadline_at=soon, reason="burst"),
        ]
        for hint in hints:
            asyncio.run(apply_hint(engine, hint, store))
        while engine.has_unfinished() or engine.loader.num_in_flight:
            engine.step()
        assert cache.on_host(periodic_key) and cache.on_host(burst_ref.key)  # both loaded
        assert cache.is_protected(periodic_key)
        assert not cache.is_protected(burst_ref.key)
    finally:
        engine.shutdown()


def test_a_prewarm_hint_carries_its_reason_through_the_stream_fields():
    for reason in ("periodic", "burst"):
        hint = Hint("prewarm", "id", "f" * 64, tier="host", deadline_at=1.0, reason=reason)
        assert Hint.from_fields(hint.to_fields()) == hint
    legacy = Hint.from_fields(
        {b"kind": b"prewarm", b"adapter_id": b"id", b"sha256": b"f" * 64, b"issued_at": b"1"}
    )
    assert legacy.reason == "" and legacy.protects  # a hint from an older control plane is kept as before
    assert not Hint("prewarm", "id", "f" * 64, reason="burst").protects


def test_worker_publishes_its_resident_adapters_with_a_ttl(redis_url):
    worker_id = f"w-{time.time_ns()}"

    async def run() -> None:
        task = asyncio.create_task(
            publish_residency(redis_url, worker_id, lambda: (1, 2, ["b", "a"], ["c"]), 0.05, 5.0)
        )
        await asyncio.sleep(0.3)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(run())
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    fields = client.hgetall(residency_key(worker_id))
    assert json.loads(fields["device_adapters"]) == ["a", "b"] and json.loads(fields["host_adapters"]) == [
        "c"
    ]
    assert fields["running"] == "1" and 0 < client.pttl(residency_key(worker_id)) <= 5000
    client.delete(residency_key(worker_id))
