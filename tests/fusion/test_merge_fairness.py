"""The merge build queue is shared fairly: one tenant may have only a few builds pending, so its burst of
distinct merges never locks the other tenants out; builds its calls abandoned stop counting for it."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from data_plane.fusion.store import MergeQueueFull, MergeStore
from openlora.v1 import inference_pb2
from tests.fusion.merge_support import gate_builds, shared_model, spec_of, until
from tests.fusion.test_merge_worker import _generate, _request
from tests.worker import conftest as worker

system = worker.system
tiny_model_dir = worker.tiny_model_dir
METHODS = ("ties", "magnitude_prune", "dare_linear", "dare_ties")
WEIGHTS = {"r4_qv": 0.8, "r8_all": 0.6, "r16_rslora": 0.5}


@pytest.fixture(scope="session")
def merge_model(tmp_path_factory):
    return shared_model(tmp_path_factory)


def test_a_tenant_past_its_share_is_refused_while_another_still_builds(merge_model, tmp_path, monkeypatch):
    gate, started = gate_builds(monkeypatch)
    store = MergeStore(tmp_path / "merges", None, 64, max_pending_builds=8, max_pending_builds_per_tenant=2)
    a_specs = [spec_of(merge_model, WEIGHTS, method) for method in METHODS[:3]]
    b_spec = spec_of(merge_model, WEIGHTS, "dare_ties")

    async def main():
        a_builds = [asyncio.create_task(store.build(spec, tenant_id="a")) for spec in a_specs[:2]]
        await until(lambda: started)
        with pytest.raises(MergeQueueFull) as refused:
            await store.build(a_specs[2], tenant_id="a")
        # Another tenant's new merge takes its own share; joining a merge already pending is no new build.
        b_build = asyncio.create_task(store.build(b_spec, tenant_id="b"))
        b_joins = asyncio.create_task(store.build(a_specs[1], tenant_id="b"))
        await asyncio.sleep(0)
        assert store.num_pending_builds == 3 and store.pending_builds_of("b") == 2
        gate.set()
        return refused.value, await asyncio.gather(*a_builds, b_build, b_joins)

    refused, done = asyncio.run(main())
    assert "per-tenant limit of 2" in str(refused)
    assert [m.key for m in done] == [
        a_specs[0].key(64),
        a_specs[1].key(64),
        b_spec.key(64),
        a_specs[1].key(64),
    ]
    assert asyncio.run(store.build(a_specs[2], tenant_id="a")).report is not None  # its share is free again


def test_the_queues_last_places_go_to_tenants_with_no_build_pending(merge_model, tmp_path, monkeypatch):
    """Four tenants each at their share filled the whole queue and every other tenant's new merges were
    refused. The last places (RESERVED_FOR_NEW_TENANTS, at most a quarter: 2 of 8 here) take only a
    tenant with none pending."""
    gate, started = gate_builds(monkeypatch)
    store = MergeStore(tmp_path / "merges", None, 64, max_pending_builds=8, max_pending_builds_per_tenant=2)
    specs = [
        spec_of(merge_model, {"r4_qv": 0.1 * (i + 1), "r8_all": 0.6}, METHODS[i % len(METHODS)])
        for i in range(9)
    ]

    async def main():
        builds = [
            asyncio.create_task(store.build(specs[i], tenant_id=tenant))
            for i, tenant in enumerate(("a", "a", "b", "b", "c", "c", "d"))
        ]
        await until(lambda: started)
        await asyncio.sleep(0)
        assert store.num_pending_builds == 7  # d, with none pending, took a kept place
        with pytest.raises(MergeQueueFull) as refused:
            await store.build(specs[7], tenant_id="d")  # within d's share, but d has one pending now
        builds.append(asyncio.create_task(store.build(specs[8], tenant_id="e")))
        await asyncio.sleep(0)
        assert store.num_pending_builds == 8
        gate.set()
        await asyncio.gather(*builds)
        return refused.value

    refused = asyncio.run(main())
    assert "the last 2 places are kept for tenants with none pending" in str(refused)


def test_builds_a_tenant_abandoned_no_longer_count_against_it(merge_model, tmp_path, monkeypatch):
    gate, started = gate_builds(monkeypatch)
    store = MergeStore(tmp_path / "merges", None, 64, max_pending_builds_per_tenant=2)
    running, queued, later = (spec_of(merge_model, WEIGHTS, method) for method in METHODS[:3])

    async def main():
        first = asyncio.create_task(store.build(running, tenant_id="a"))
        await until(lambda: started)
        abandoned = asyncio.create_task(store.build(queued, tenant_id="a"))
        await asyncio.sleep(0)
        assert store.pending_builds_of("a") == 2
        abandoned.cancel()  # the caller went away: its queued build is dropped and its place freed
        with pytest.raises(asyncio.CancelledError):
            await abandoned
        # The running build, whose caller also leaves, completes but is no longer the tenant's.
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert store.pending_builds_of("a") == 0
        again = asyncio.create_task(store.build(later, tenant_id="a"))
        also = asyncio.create_task(store.build(queued, tenant_id="a"))
        await asyncio.sleep(0)
        gate.set()
        return await asyncio.gather(again, also)

    done = asyncio.run(main())
    assert [m.key for m in done] == [later.key(64), queued.key(64)]


def test_the_per_tenant_share_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="max_pending_builds_per_tenant"):
        MergeStore(tmp_path / "merges", None, 64, max_pending_builds_per_tenant=0)


def test_one_tenants_burst_of_distinct_merges_leaves_room_for_another_tenant(system, monkeypatch):
    """Over gRPC: tenant A's distinct slow merges fill its share (4) and its next one is RESOURCE_EXHAUSTED
    naming the per-tenant limit, while tenant B's merge is still accepted, built and served."""
    gate, started = gate_builds(monkeypatch)
    stores: list[MergeStore] = []
    real_build = MergeStore.build

    async def build(self, *args, **kwargs):
        stores.append(self)
        return await real_build(self, *args, **kwargs)

    monkeypatch.setattr(MergeStore, "build", build)
    _, _, key_a = system.new_tenant()
    _, _, key_b = system.new_tenant()
    ties = inference_pb2.MIX_METHOD_TIES
    a_mixes = [[("ad0", 0.5), ("ad1", 0.5)], [("ad2", 0.5), ("ad3", 0.5)], [("ad4", 0.5), ("ad5", 0.5)]]
    a_mixes.append([("ad6", 0.5), ("ad7", 0.5)])

    def pending() -> int:
        return stores[-1].num_pending_builds if stores else 0

    with ThreadPoolExecutor(6) as pool:
        try:
            a_calls = [pool.submit(_generate, system.target, key_a, _request(mix, ties)) for mix in a_mixes]
            asyncio.run(_wait_for(lambda: pending() == 4))
            with pytest.raises(grpc.RpcError) as refused:
                _generate(system.target, key_a, _request([("ad0", 0.5), ("ad2", 0.5)], ties))
            b_call = pool.submit(
                _generate, system.target, key_b, _request([("ad1", 0.5), ("ad3", 0.5)], ties)
            )
            asyncio.run(_wait_for(lambda: pending() == 5))  # B's build is queued, not refused
        finally:
            gate.set()
        b_tokens, b_last = b_call.result(timeout=120)
        a_results = [call.result(timeout=120) for call in a_calls]
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "per-tenant limit of 4" in refused.value.details()
    assert len(b_tokens) == 8 and b_last.usage.completion_tokens == 8
    assert [len(tokens) for tokens, _ in a_results] == [8, 8, 8, 8]
    assert len(started) == 5


async def _wait_for(condition, timeout_s: float = 60.0) -> None:
    await asyncio.wait_for(until(condition), timeout_s)


def test_the_per_tenant_share_is_a_worker_setting(tmp_path):
    from data_plane.server.config import WorkerConfig
    from openlora.cli import build_parser
    from openlora.commands.serving import worker_config_from_args

    common = ["worker", "--model", str(tmp_path), "--control-plane", "cp:1", "--worker-token", "t"]
    args = build_parser().parse_args([*common, "--max-pending-merges-per-tenant", "2"])
    assert worker_config_from_args(args).max_pending_merges_per_tenant == 2
    assert worker_config_from_args(build_parser().parse_args(common)).max_pending_merges_per_tenant == 4
    with pytest.raises(ValueError, match="max_pending_merges_per_tenant"):
        WorkerConfig(
            model_dir=tmp_path,
            control_plane_target="cp:1",
            worker_token="t",
            state_dir=tmp_path,
            max_pending_merges_per_tenant=0,
        )


def test_queued_builds_take_turns_by_tenant(merge_model, tmp_path, monkeypatch):
    """One worker thread built merges in arrival order: a tenant keeping its share of the queue full made
    another's new merge wait for all of them (about 10x its build time on the demo model). The next build
    is now the oldest of the tenant served least."""
    gate, started = gate_builds(monkeypatch)
    store = MergeStore(tmp_path / "merges", None, 64, max_pending_builds_per_tenant=4)
    a_specs = [spec_of(merge_model, WEIGHTS, method) for method in METHODS]
    b_spec = spec_of(merge_model, {"r4_qv": 0.3, "r8_all": 0.7}, "ties")

    async def main():
        a_builds = [asyncio.create_task(store.build(a_specs[0], tenant_id="a"))]
        await until(lambda: started)  # a's first build holds the builder
        a_builds += [asyncio.create_task(store.build(spec, tenant_id="a")) for spec in a_specs[1:]]
        await asyncio.sleep(0)
        b_build = asyncio.create_task(store.build(b_spec, tenant_id="b"))
        await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(*a_builds, b_build)

    asyncio.run(main())
    assert started == [a_specs[0].key(64), b_spec.key(64), *(spec.key(64) for spec in a_specs[1:])]
