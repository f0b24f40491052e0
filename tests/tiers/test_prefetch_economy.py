"""Hint economy: a prefetch the host tier cannot keep is refused before any disk read, one of an adapter
already held is skipped, and prefetched copies that leave their tier before any request used them are
counted as wasted (once), through the real engine and the worker's Prometheus registry."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from prometheus_client import generate_latest

from data_plane.adapters.hint_actions import apply_hint
from data_plane.server.artifact_store import ArtifactStore
from data_plane.server.metrics import WorkerMetrics
from openlora.artifact import ARTIFACT_FILES
from openlora.hints import Hint
from tests.engine.conftest import greedy, make_engine, run_to_completion

# Host-buffer sizes in fp32: r4_qv 7,168 B, r8_all 65,536 B, r16_rslora 77,824 B.
ONE_ADAPTER_BUDGET = 80_000  # r8_all or r16_rslora, never both


def _drain(engine) -> None:
    while engine.has_unfinished():
        engine.step()


def _count_reads(engine) -> list:
    """Records every disk read of the engine's loader (its `_read`), still reading."""
    reads = []
    read = engine.loader._read

    def recording(members):
        reads.append(tuple(m.key for m in members))
        return read(members)

    engine.loader._read = recording
    return reads


def test_prefetch_into_a_host_tier_of_zero_bytes_reads_nothing_and_counts_a_skip(tiny_model):
    engine = make_engine(tiny_model, host_cache_bytes=0)
    try:
        reads = _count_reads(engine)
        ref = tiny_model.ref("r8_all")
        engine.prefetch(ref.key, (ref,), deadline_at=time.monotonic() + 60)
        engine.step()
        assert engine.loader.num_in_flight == 0
        _drain(engine)
        assert reads == [] and engine.load_counts == {}
        assert not engine.adapter_cache.on_host(ref.key)
        assert engine.prefetch_stats() == {("skipped", "no_room"): 1}
    finally:
        engine.shutdown()


def test_prefetch_of_an_adapter_already_held_is_skipped(tiny_model):
    engine = make_engine(tiny_model, host_cache_bytes=64 << 20)
    try:
        ref = tiny_model.ref("r8_all")
        engine.prefetch(ref.key, (ref,))
        _drain(engine)
        assert engine.adapter_cache.tier_of(ref.key) == "host"
        reads = _count_reads(engine)
        engine.prefetch(ref.key, (ref,))  # host asked, host held
        _drain(engine)
        engine.add_request(greedy("r", [3, 4], [ref], max_tokens=2))
        run_to_completion(engine)
        engine.prefetch(ref.key, (ref,), to_device=True)  # in a slot now: warmer than asked
        engine.prefetch(ref.key, (ref,))
        _drain(engine)
        assert reads == []
        stats = engine.prefetch_stats()
        assert stats[("skipped", "held")] == 3 and stats[("performed", "host")] == 1
    finally:
        engine.shutdown()


def test_prefetched_host_copy_evicted_unused_counts_wasted_once(tiny_model):
    engine = make_engine(tiny_model, host_cache_bytes=ONE_ADAPTER_BUDGET)
    try:
        prefetched, other = tiny_model.ref("r16_rslora"), tiny_model.ref("r8_all")
        engine.prefetch(prefetched.key, (prefetched,))
        _drain(engine)
        assert engine.adapter_cache.on_host(prefetched.key)
        engine.add_request(greedy("other", [3, 4], [other], max_tokens=2))  # its host copy takes the room
        run_to_completion(engine)
        assert not engine.adapter_cache.on_host(prefetched.key)
        assert engine.adapter_cache.on_host(other.key)
        for i in range(3):  # later traffic does not count it again
            engine.add_request(greedy(f"again{i}", [5, 6], [other], max_tokens=2))
            run_to_completion(engine)
        stats = engine.prefetch_stats()
        assert stats[("performed", "host")] == 1 and stats[("wasted", "host")] == 1
    finally:
        engine.shutdown()


def test_prefetched_host_copy_used_by_a_request_is_not_wasted_when_evicted_later(tiny_model):
    engine = make_engine(tiny_model, host_cache_bytes=ONE_ADAPTER_BUDGET, num_adapter_slots=1)
    try:
        prefetched, other = tiny_model.ref("r16_rslora"), tiny_model.ref("r8_all")
        engine.prefetch(prefetched.key, (prefetched,))
        _drain(engine)
        engine.add_request(greedy("user", [3, 4], [prefetched], max_tokens=2))
        run_to_completion(engine)
        for i in range(3):  # the other adapter, used more, takes the slot and the host room
            engine.add_request(greedy(f"other{i}", [3, 4], [other], max_tokens=2))
            run_to_completion(engine)
        assert not engine.adapter_cache.on_host(prefetched.key)
        assert engine.adapter_cache.tier_of(prefetched.key) == "disk"
        stats = engine.prefetch_stats()
        assert stats[("performed", "host")] == 1 and ("wasted", "host") not in stats
    finally:
        engine.shutdown()


def test_prefetched_slot_evicted_unused_counts_wasted_and_is_exported(tiny_model):
    engine = make_engine(tiny_model, host_cache_bytes=0, num_adapter_slots=1)
    metrics = WorkerMetrics()
    metrics.watch_prefetches(engine.prefetch_stats)
    try:
        prefetched, other = tiny_model.ref("r4_qv"), tiny_model.ref("r8_all")
        engine.prefetch(prefetched.key, (prefetched,), to_device=True)
        _drain(engine)
        assert engine.adapter_cache.tier_of(prefetched.key) == "device"
        engine.add_request(greedy("other", [3, 4], [other], max_tokens=2))  # takes the only slot
        run_to_completion(engine)
        assert engine.adapter_cache.tier_of(prefetched.key) == "disk"
        stats = engine.prefetch_stats()
        assert stats[("performed", "device")] == 1 and stats[("wasted", "device")] == 1
        assert ("performed", "host") not in stats and ("wasted", "host") not in stats
        text = generate_latest(metrics.registry).decode()
        assert 'openlora_prefetch_total{tier="device"} 1.0' in text
        assert 'openlora_prefetch_wasted_total{tier="device"} 1.0' in text
        assert 'openlora_prefetch_wasted_total{tier="host"} 0.0' in text
        assert 'openlora_prefetch_skipped_total{reason="no_room"} 0.0' in text
    finally:
        engine.shutdown()


def test_prewarm_hint_the_host_tier_declines_still_fetches_to_local_disk(tiny_model, tmp_path):
    ref = tiny_model.ref("r8_all")

    async def fetch(sha256: str):
        for name in sorted(ARTIFACT_FILES):
            data = (ref.path / name).read_bytes()
            yield SimpleNamespace(filename=name, offset=0, data=data, file_size_bytes=len(data))

    engine = make_engine(tiny_model, host_cache_bytes=0)
    try:
        store = ArtifactStore(tmp_path / "artifacts", fetch, engine.spec, 64, 1 << 30, max_disk_bytes=1 << 30)
        hint = Hint("prewarm", "id", ref.key, tier="host", deadline_at=time.time() + 60)
        asyncio.run(apply_hint(engine, hint, store))
        _drain(engine)
        assert store.contains(ref.key)  # the disk tier can keep it: the call will not go remote
        assert engine.prefetch_stats() == {("skipped", "no_room"): 1}
        assert not engine.adapter_cache.on_host(ref.key) and engine.load_counts == {}
    finally:
        engine.shutdown()


def test_prewarm_hint_for_the_disk_tier_fetches_and_loads_nothing(tiny_model, tmp_path):
    ref = tiny_model.ref("r4_qv")

    async def fetch(sha256: str):
        for name in sorted(ARTIFACT_FILES):
            data = (ref.path / name).read_bytes()
            yield SimpleNamespace(filename=name, offset=0, data=data, file_size_bytes=len(data))

    engine = make_engine(tiny_model, host_cache_bytes=64 << 20)
    try:
        store = ArtifactStore(tmp_path / "artifacts", fetch, engine.spec, 64, 1 << 30)
        hint = Hint("prewarm", "id", ref.key, tier="disk", deadline_at=time.time() + 60)
        asyncio.run(apply_hint(engine, hint, store))
        _drain(engine)
        assert store.contains(ref.key)
        assert engine.load_counts == {} and engine.prefetch_stats() == {}
        assert engine.adapter_cache.tier_of(ref.key) == "disk"
    finally:
        engine.shutdown()
