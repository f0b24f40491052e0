"""The disk tier keeps what this worker served in the last day: prefetched, never served artifacts make
room first, so a served adapter is never fetched from the control plane again while the budget holds."""

from __future__ import annotations

import asyncio
import os

from data_plane.server.artifact_store import SERVED_WINDOW_S, ArtifactStore
from openlora.artifact import digest_dir

from .test_artifact_store import SPEC, chunks_of, write_adapter


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


class Remote:
    """Streams each artifact's chunks as WorkerService.FetchArtifact does; counts fetches per sha256."""

    def __init__(self, chunks_by_sha) -> None:
        self.chunks_by_sha = chunks_by_sha
        self.calls: dict[str, int] = {}

    async def __call__(self, sha256: str):
        self.calls[sha256] = self.calls.get(sha256, 0) + 1
        for chunk in self.chunks_by_sha[sha256]:
            await asyncio.sleep(0)
            yield chunk


def _artifacts(tmp_path, count: int) -> tuple[list[str], Remote, int]:
    """`count` distinct adapters of equal size: their sha256s, a remote serving them, and one's bytes."""
    shas, chunks = [], {}
    for i in range(count):
        path = write_adapter(tmp_path / f"src{i}", seed=i)
        sha = digest_dir(path)
        shas.append(sha)
        chunks[sha] = chunks_of(path)
    size = sum(len(c.data) for c in chunks[shas[0]])
    return shas, Remote(chunks), size


def _store(tmp_path, remote, max_disk_bytes: int, clock=None) -> ArtifactStore:
    return ArtifactStore(
        tmp_path / "artifacts",
        remote,
        SPEC,
        64,
        1 << 20,
        max_disk_bytes=max_disk_bytes,
        clock=clock or FakeClock(),
    )


def test_prefetches_never_push_out_an_artifact_served_in_the_last_day(tmp_path):
    (served, *predicted), remote, size = _artifacts(tmp_path, 4)
    clock = FakeClock()
    store = _store(tmp_path, remote, max_disk_bytes=2 * size, clock=clock)

    async def run() -> str:
        await store.ensure(served, hold=True)  # a request's stream
        store.release([served])
        for sha in predicted:  # prewarm hints fetch ahead of time, never served here
            clock.now_s += 600
            await store.ensure(sha)
        clock.now_s += 12 * 3600
        again = await store.ensure(served, hold=True)
        store.release([served])
        return again.tier

    assert asyncio.run(run()) == "disk"
    assert remote.calls[served] == 1
    assert store.contains(served) and store.contains(predicted[-1])  # the newest prefetch stays too
    assert not any(store.contains(sha) for sha in predicted[:-1])
    assert store.used_bytes <= 2 * size


def test_an_artifact_served_over_a_day_ago_goes_like_an_unserved_one(tmp_path):
    (old, recent, fetched), remote, size = _artifacts(tmp_path, 3)
    clock = FakeClock()
    store = _store(tmp_path, remote, max_disk_bytes=2 * size, clock=clock)

    async def run() -> None:
        for sha in (old, recent):
            await store.ensure(sha, hold=True)
            store.release([sha])
            clock.now_s += 20 * 3600  # old: served 40 h before the prefetch, recent: 20 h
        await store.ensure(fetched)

    asyncio.run(run())
    assert store.served_recently(recent) and not store.served_recently(old)
    assert not store.contains(old) and store.contains(recent) and store.contains(fetched)


def test_an_artifact_written_before_the_clock_stepped_back_is_not_kept_as_served_for_the_step(tmp_path):
    """An artifact found at start counts as used when its files were written; written before the worker's
    clock stepped back a week, that lay a week ahead, and it counted as served (kept ahead of every
    unserved one) for the week and a day. Written "in the future", it counts as written at start."""
    (sha,), remote, size = _artifacts(tmp_path, 1)
    asyncio.run(_store(tmp_path, remote, max_disk_bytes=2 * size).ensure(sha))
    written = tmp_path / "artifacts" / sha
    ahead_s = written.stat().st_mtime + 7 * 86_400
    os.utime(written, (ahead_s, ahead_s))
    clock = FakeClock()
    restarted = _store(tmp_path, remote, max_disk_bytes=2 * size, clock=clock)
    assert restarted.served_recently(sha)
    clock.now_s += SERVED_WINDOW_S + 3600
    assert not restarted.served_recently(sha)
