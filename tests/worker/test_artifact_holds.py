"""Discarding an artifact never pulls files from under a holder; a stale artifact is fetched afresh."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from openlora.artifact import digest_dir
from tests.worker.test_artifact_store import Remote, _store, chunks_of, write_adapter


@pytest.fixture
def adapter(tmp_path: Path) -> tuple[Path, str]:
    path = write_adapter(tmp_path / "src")
    return path, digest_dir(path)


def test_discard_of_a_held_artifact_keeps_its_files_until_the_last_hold_is_released(tmp_path, adapter):
    src, sha = adapter
    store = _store(tmp_path, Remote(chunks_of(src)))

    async def hold_twice():
        return await store.ensure(sha, hold=True), await store.ensure(sha, hold=True)

    first, _ = asyncio.run(hold_twice())
    store.discard(sha)
    assert first.path.is_dir() and digest_dir(first.path) == sha  # the holders still read it
    assert store.is_stale(sha) and not store.contains(sha)
    store.release([sha])
    assert first.path.is_dir() and digest_dir(first.path) == sha
    store.release([sha])
    assert not first.path.exists() and not store.is_stale(sha)
    assert [p.name for p in store.root.iterdir()] == []


def test_ensure_of_a_stale_artifact_fetches_it_again_and_the_holder_path_stays_valid(tmp_path, adapter):
    src, sha = adapter
    remote = Remote(chunks_of(src))
    store = _store(tmp_path, remote)
    held = asyncio.run(store.ensure(sha, hold=True))
    store.discard(sha)
    again = asyncio.run(store.ensure(sha))
    assert again.tier == "remote" and remote.calls == 2  # not served from the stale copy
    assert again.path == held.path and digest_dir(held.path) == sha
    assert not store.is_stale(sha) and store.contains(sha)
    store.release([sha])
    assert store.contains(sha)  # the fresh copy stays: it is no longer stale
    assert asyncio.run(store.ensure(sha)).tier == "disk"
