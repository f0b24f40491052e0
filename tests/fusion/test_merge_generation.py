"""A merged mix generates the tokens transformers + PEFT generate with the same weighted adapter, and the
merge store builds each canonical spec once, off the event loop, and forgets merges of a dropped source."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest
import torch

from data_plane.engine.errors import QueueFull
from data_plane.engine.request import AdapterRef
from data_plane.fusion.store import MergeStore
from tests.engine.conftest import greedy, make_engine, run_to_completion
from tests.engine.reference import load_reference, reference_greedy
from tests.fusion.merge_support import (
    build,
    build_in_fresh_process,
    gate_builds,
    shared_model,
    spec_of,
    until,
)

WEIGHTS = {"r4_qv": 0.8, "r8_all": 0.6, "r16_rslora": 0.5}
PROMPT = [3, 17, 42, 99, 5, 61, 7]


@pytest.fixture(scope="session")
def merge_model(tmp_path_factory):
    return shared_model(tmp_path_factory)


@pytest.mark.parametrize(
    ("method", "combination_type", "density", "sign"),
    [("ties", "ties_svd", 0.5, "total"), ("magnitude_prune", "magnitude_prune_svd", 0.6, "total")],
)
def test_merged_mix_generates_peft_weighted_adapter_tokens(
    merge_model, tmp_path, method, combination_type, density, sign
):
    report, _ = build(
        merge_model, tmp_path / "m", WEIGHTS, method, 64, density=density, majority_sign_method=sign
    )
    engine = make_engine(merge_model, max_lora_rank=64)
    try:
        key = spec_of(merge_model, WEIGHTS, method, density=density, majority_sign_method=sign).key(64)
        engine.add_request(greedy("merged", PROMPT, [AdapterRef(key=key, path=tmp_path / "m")]))
        engine.add_request(greedy("base", PROMPT))
        ours = run_to_completion(engine)
    finally:
        engine.shutdown()

    reference = load_reference(merge_model.model_dir, [merge_model.adapter_dirs[n] for n in WEIGHTS])
    reference.add_weighted_adapter(
        [f"a{i}" for i in range(len(WEIGHTS))],
        list(WEIGHTS.values()),
        "merged",
        combination_type=combination_type,
        svd_rank=report.rank,
        density=density,
        majority_sign_method=sign,
    )
    reference.set_adapter("merged")
    tokens, logprobs = reference_greedy(reference, PROMPT)
    assert ours["merged"][0] == tokens
    torch.testing.assert_close(torch.tensor(ours["merged"][1]), torch.tensor(logprobs), atol=2e-4, rtol=0)
    assert ours["merged"][0] != ours["base"][0]  # the merge changes the output


def test_each_spec_is_built_once_however_many_wait(merge_model, tmp_path):
    built = []
    store = MergeStore(tmp_path / "merges", None, 64, on_built=lambda spec, key, report: built.append(key))
    spec = spec_of(merge_model, WEIGHTS, "dare_ties", density=0.5)
    reordered = spec_of(merge_model, dict(reversed(WEIGHTS.items())), "dare_ties", density=0.5)

    async def main():
        return await asyncio.gather(*(store.build(s, hold=True) for s in (spec, reordered, spec)))

    merges = asyncio.run(main())
    assert len(built) == 1 and {m.key for m in merges} == {spec.key(64)}
    assert all(m.report is not None for m in merges)  # each waited for the one build
    assert store.lookup(spec) is not None and store.lookup(spec).report is None
    again = MergeStore(tmp_path / "merges", None, 64)  # a restart finds it on disk
    assert again.contains(spec.key(64))


def test_a_merge_is_rebuilt_bit_for_bit(merge_model, tmp_path):
    weights_file = "adapter_model.safetensors"
    spec = spec_of(merge_model, WEIGHTS, "dare_linear", density=0.3)
    first, second = MergeStore(tmp_path / "one", None, 64), MergeStore(tmp_path / "two", None, 64)
    a = asyncio.run(first.build(spec))
    b = asyncio.run(
        second.build(spec_of(merge_model, dict(reversed(WEIGHTS.items())), "dare_linear", density=0.3))
    )
    assert a.key == b.key
    assert (a.path / weights_file).read_bytes() == (b.path / weights_file).read_bytes()
    # A fresh interpreter (a restarted or another worker) draws the same masks.
    paths = {src.key: str(src.path) for src in spec.sources}
    digest = build_in_fresh_process(spec.canonical_json(), paths, str(tmp_path / "fresh"), 64)
    assert digest == hashlib.sha256((a.path / weights_file).read_bytes()).hexdigest()


def test_the_build_leaves_the_event_loop_free(merge_model, tmp_path):
    store = MergeStore(tmp_path / "merges", None, 64)
    spec = spec_of(merge_model, WEIGHTS, "ties", density=0.5)
    ticks_during_build = []

    async def main():
        done = asyncio.Event()

        async def ticker():
            ticks = 0
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0)
            ticks_during_build.append(ticks)

        async def build():
            await store.build(spec)
            done.set()

        await asyncio.gather(build(), ticker())

    asyncio.run(main())
    assert ticks_during_build[0] > 0


def test_dropping_a_source_forgets_its_merges_after_their_holders(merge_model, tmp_path):
    store = MergeStore(tmp_path / "merges", None, 64)
    held = asyncio.run(store.build(spec_of(merge_model, WEIGHTS, "ties"), hold=True))
    other = asyncio.run(store.build(spec_of(merge_model, {"r8_all": 1.0, "r16_rslora": 1.0}, "ties")))
    sha = spec_of(merge_model, {"r4_qv": 1.0}, "ties").sources[0].key
    assert store.drop_source(sha) == [held.key]
    assert not store.contains(held.key) and held.path.is_dir()  # its stream still reads it
    store.release([held.key])
    assert not held.path.exists()
    assert store.contains(other.key)
    assert not MergeStore(tmp_path / "merges", None, 64).contains(held.key)


def test_the_disk_budget_removes_the_least_recently_used_unheld_merge(merge_model, tmp_path):
    probe = MergeStore(tmp_path / "probe", None, 64)
    asyncio.run(probe.build(spec_of(merge_model, WEIGHTS, "ties")))
    one_bytes = probe.used_bytes  # every merge of these sources has the same size (rank 28, same modules)
    store = MergeStore(tmp_path / "merges", None, 64, max_disk_bytes=int(one_bytes * 1.5))
    first = asyncio.run(store.build(spec_of(merge_model, WEIGHTS, "ties")))
    held = asyncio.run(store.build(spec_of(merge_model, WEIGHTS, "magnitude_prune"), hold=True))
    assert not store.contains(first.key) and store.contains(held.key)  # over budget: the older went
    third = asyncio.run(store.build(spec_of(merge_model, WEIGHTS, "dare_linear")))
    # The held one stays whatever the budget; the new one is kept for its waiters.
    assert store.contains(held.key) and store.contains(third.key)
    store.release([held.key])
    fourth = asyncio.run(store.build(spec_of(merge_model, WEIGHTS, "dare_ties")))
    assert store.contains(fourth.key) and not store.contains(held.key) and not store.contains(third.key)


def test_a_queued_build_its_callers_left_is_never_run(merge_model, tmp_path, monkeypatch):
    gate, started = gate_builds(monkeypatch)
    built = []
    store = MergeStore(tmp_path / "merges", None, 64, on_built=lambda spec, key, report: built.append(key))
    first = spec_of(merge_model, WEIGHTS, "ties")
    abandoned = spec_of(merge_model, WEIGHTS, "magnitude_prune")

    async def main():
        running = asyncio.create_task(store.build(first))
        await until(lambda: started)  # the first build holds the builder thread
        waiter = asyncio.create_task(store.build(abandoned))
        await asyncio.sleep(0.05)  # queued behind it
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        gate.set()
        await running
        # The builder runs jobs in order: had the abandoned build stayed queued, it would run before this.
        return await store.build(abandoned)

    again = asyncio.run(main())
    assert started == [first.key(64), abandoned.key(64)]  # built once, for the caller that stayed
    assert built == started and again.report is not None and store.contains(again.key)


def test_more_distinct_merges_than_the_build_queue_holds_are_refused(merge_model, tmp_path, monkeypatch):
    gate, started = gate_builds(monkeypatch)
    store = MergeStore(tmp_path / "merges", None, 64, max_pending_builds=2)
    specs = [spec_of(merge_model, WEIGHTS, method) for method in ("ties", "magnitude_prune", "dare_linear")]

    async def main():
        builds = [asyncio.create_task(store.build(spec)) for spec in specs[:2]]
        await until(lambda: started)
        with pytest.raises(QueueFull):
            await store.build(specs[2])
        # A caller of a merge already queued joins it: no new build, no refusal.
        joiner = asyncio.create_task(store.build(specs[1]))
        gate.set()
        return await asyncio.gather(*builds, joiner)

    done = asyncio.run(main())
    assert [m.key for m in done] == [specs[0].key(64), specs[1].key(64), specs[1].key(64)]
    assert started == [specs[0].key(64), specs[1].key(64)]
    assert asyncio.run(store.build(specs[2])).report is not None  # room again once the queue drained


def test_a_merge_changed_on_disk_while_the_worker_was_down_is_built_again(merge_model, tmp_path):
    """A merge found at start is checked against the digest recorded at its build before its first use: a
    flipped byte (silently wrong weights) is removed and the merge built again, an intact one is served."""
    spec = spec_of(merge_model, WEIGHTS, "ties", density=0.5)
    built = asyncio.run(MergeStore(tmp_path / "merges", None, 64).build(spec))
    weights = built.path / "adapter_model.safetensors"
    want = weights.read_bytes()

    intact = MergeStore(tmp_path / "merges", None, 64)
    assert intact.lookup(spec) is None  # not served before its check
    assert asyncio.run(intact.build(spec)).report is None  # checked, not rebuilt

    damaged = bytearray(want)
    damaged[-3] ^= 0x80
    weights.write_bytes(bytes(damaged))
    rebuilt = []
    restarted = MergeStore(
        tmp_path / "merges", None, 64, on_built=lambda spec, key, report: rebuilt.append(key)
    )
    again = asyncio.run(restarted.build(spec))
    assert again.report is not None and rebuilt == [spec.key(64)]
    assert weights.read_bytes() == want


def _later_mtime(path) -> None:
    """Moves the file's modification time a second on: an in-place rewrite within the file system's clock
    tick (coarse on older kernels) could keep the time, and with it the whole fingerprint."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def _damage(path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x80
    path.write_bytes(bytes(data))
    _later_mtime(path)


def test_a_merge_changed_on_disk_while_the_worker_runs_is_built_again_not_served(merge_model, tmp_path):
    """Merges were checked against their digest only once, at start: a flipped byte written while the
    worker ran was served (silently wrong tokens) and a damaged header failed every call until a restart."""
    spec = spec_of(merge_model, WEIGHTS, "ties", density=0.5)
    damaged_keys, rebuilt = [], []
    store = MergeStore(
        tmp_path / "merges",
        None,
        64,
        on_built=lambda spec, key, report: rebuilt.append(key),
        on_damaged=damaged_keys.append,
    )
    built = asyncio.run(store.build(spec))
    weights = built.path / "adapter_model.safetensors"
    want = weights.read_bytes()
    assert store.lookup(spec) is not None  # unchanged: served from disk without a check

    weights.write_bytes(want)  # the same bytes written again: checked, and served as they are
    _later_mtime(weights)
    assert store.lookup(spec) is None
    assert asyncio.run(store.build(spec)).report is None and damaged_keys == []
    assert store.lookup(spec) is not None

    _damage(weights)
    assert store.lookup(spec) is None  # never served unchecked
    again = asyncio.run(store.build(spec))
    assert again.report is not None and rebuilt == [spec.key(64)] * 2
    assert damaged_keys == [spec.key(64)]
    assert weights.read_bytes() == want


def test_a_held_merge_that_fails_its_check_is_removed_and_built_again(merge_model, tmp_path):
    spec = spec_of(merge_model, WEIGHTS, "ties", density=0.5)
    store = MergeStore(tmp_path / "merges", None, 64)
    built = asyncio.run(store.build(spec, hold=True))  # a running stream holds it
    want = (built.path / "adapter_model.safetensors").read_bytes()
    _damage(built.path / "adapter_model.safetensors")
    again = asyncio.run(store.build(spec, hold=True))
    assert again.report is not None
    assert (again.path / "adapter_model.safetensors").read_bytes() == want
    store.release([built.key, again.key])
    assert store.lookup(spec) is not None


def test_a_merge_whose_load_failed_is_checked_even_when_its_files_look_unchanged(merge_model, tmp_path):
    """Bytes changed with the size, modification time and inode kept (bit rot, an in-place rewrite that
    restores the times): only a failed load tells; `suspect` has the next use check the digest."""
    spec = spec_of(merge_model, WEIGHTS, "ties", density=0.5)
    store = MergeStore(tmp_path / "merges", None, 64)
    built = asyncio.run(store.build(spec))
    weights = built.path / "adapter_model.safetensors"
    want, stat = weights.read_bytes(), weights.stat()
    _damage(weights)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert store.lookup(spec) is not None  # nothing to tell from its files' fingerprint
    store.suspect(built.key)
    assert store.lookup(spec) is None
    assert asyncio.run(store.build(spec)).report is not None
    assert weights.read_bytes() == want
