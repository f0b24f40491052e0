"""The worker's disk cache of artifacts: verified before it is published, shared downloads, no debris."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import save_file

from data_plane.server.artifact_store import ArtifactError, ArtifactRejected, ArtifactStore
from openlora.artifact import ARTIFACT_FILES, digest_dir
from openlora.base_model import BaseModelSpec

SPEC = BaseModelSpec(
    name="tiny",
    architecture="LlamaForCausalLM",
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    vocab_size=100,
)


def write_adapter(path: Path, rank: int = 4, seed: int = 0) -> Path:
    """A PEFT-layout LoRA on q_proj and v_proj of SPEC."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    tensors = {}
    for layer in range(SPEC.num_layers):
        for module in ("q_proj", "v_proj"):
            in_f, out_f = SPEC.projection_shape(module)
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((rank, in_f)).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((out_f, rank)).astype(np.float32)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "v_proj"]}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def chunks_of(path: Path, chunk_bytes: int = 1000, corrupt: bool = False, truncate: bool = False):
    out = []
    for name in sorted(ARTIFACT_FILES):
        data = bytearray((path / name).read_bytes())
        size = len(data)
        if corrupt and name.endswith(".safetensors"):
            data[-1] ^= 0xFF
        if truncate and name.endswith(".safetensors"):
            data = data[: size // 2]
        for offset in range(0, len(data), chunk_bytes):
            first = offset == 0
            out.append(
                SimpleNamespace(
                    filename=name if first else "",
                    offset=offset,
                    data=bytes(data[offset : offset + chunk_bytes]),
                    file_size_bytes=size if first else 0,
                )
            )
    return out


class Remote:
    """Serves an artifact's chunks the way WorkerService.FetchArtifact streams them."""

    def __init__(self, chunks) -> None:
        self.chunks = chunks
        self.calls = 0

    async def __call__(self, sha256: str):
        self.calls += 1
        for chunk in self.chunks:
            await asyncio.sleep(0)
            yield chunk


@pytest.fixture
def adapter(tmp_path: Path) -> tuple[Path, str]:
    path = write_adapter(tmp_path / "src")
    return path, digest_dir(path)


def _store(tmp_path: Path, remote, max_rank: int = 64) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts", remote, SPEC, max_rank, 1 << 20)


def _debris(store: ArtifactStore) -> list[str]:
    return sorted(p.name for p in store.root.iterdir())


def test_missing_artifact_is_fetched_verified_then_found_on_disk(tmp_path, adapter):
    src, sha = adapter
    remote = Remote(chunks_of(src))
    store = _store(tmp_path, remote)

    async def scenario():
        return await store.ensure(sha), await store.ensure(sha)

    first, second = asyncio.run(scenario())
    assert (first.tier, second.tier) == ("remote", "disk")
    assert remote.calls == 1
    assert digest_dir(first.path) == sha
    assert _debris(store) == [sha]


def test_concurrent_requests_share_one_download(tmp_path, adapter):
    src, sha = adapter
    remote = Remote(chunks_of(src, chunk_bytes=100))
    store = _store(tmp_path, remote)

    async def scenario():
        return await asyncio.gather(*(store.ensure(sha) for _ in range(5)))

    results = asyncio.run(scenario())
    assert remote.calls == 1
    assert {r.path for r in results} == {store.root / sha}


@pytest.mark.parametrize("damage", ["corrupt", "truncate"])
def test_corrupt_or_partial_download_is_discarded_never_published(tmp_path, adapter, damage):
    src, sha = adapter
    remote = Remote(chunks_of(src, corrupt=damage == "corrupt", truncate=damage == "truncate"))
    store = _store(tmp_path, remote)
    with pytest.raises(ArtifactError):
        asyncio.run(store.ensure(sha))
    assert _debris(store) == []
    # A later good download succeeds.
    remote.chunks = chunks_of(src)
    assert asyncio.run(store.ensure(sha)).tier == "remote"


def test_adapter_this_worker_cannot_hold_is_rejected_and_not_kept(tmp_path, adapter):
    src, sha = adapter
    store = _store(tmp_path, Remote(chunks_of(src)), max_rank=2)
    with pytest.raises(ArtifactRejected) as caught:
        asyncio.run(store.ensure(sha))
    assert caught.value.field == "adapter_config.json.r"
    assert _debris(store) == []


def test_unexpected_file_name_in_the_stream_is_refused(tmp_path, adapter):
    src, sha = adapter
    chunks = chunks_of(src)
    chunks[0].filename = "../evil.bin"
    store = _store(tmp_path, Remote(chunks))
    with pytest.raises(ArtifactError, match="unexpected file"):
        asyncio.run(store.ensure(sha))
    assert _debris(store) == []
    assert not (tmp_path / "evil.bin").exists()


def test_discarded_artifact_is_fetched_again(tmp_path, adapter):
    src, sha = adapter
    remote = Remote(chunks_of(src))
    store = _store(tmp_path, remote)
    asyncio.run(store.ensure(sha))
    store.discard(sha)
    assert not store.contains(sha)
    assert asyncio.run(store.ensure(sha)).tier == "remote"
    assert remote.calls == 2


def test_partial_directories_of_a_killed_process_are_removed_at_start(tmp_path, adapter):
    (tmp_path / "artifacts" / ".partial-abc").mkdir(parents=True)
    store = _store(tmp_path, Remote([]))
    assert _debris(store) == []


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing"])
def test_a_copy_changed_on_disk_while_the_worker_was_down_is_fetched_again(tmp_path, adapter, damage):
    """An artifact found at start is checked at its first use: a flipped byte (same size, silently wrong
    weights), a truncated file or a missing one is removed and fetched afresh, never served."""
    src, sha = adapter
    remote = Remote(chunks_of(src))
    asyncio.run(_store(tmp_path, remote).ensure(sha))
    weights = tmp_path / "artifacts" / sha / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "flip":
        data[-3] ^= 0x80  # a sign bit of the last value: still a valid safetensors file
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(bytes(data[: len(data) // 2]))
    else:
        weights.unlink()

    restarted = _store(tmp_path, remote)

    async def scenario():
        return await asyncio.gather(*(restarted.ensure(sha) for _ in range(3)))

    results = asyncio.run(scenario())
    assert {r.tier for r in results} == {"remote"} and remote.calls == 2
    assert digest_dir(restarted.root / sha) == sha


@pytest.mark.parametrize("damage", ["other_adapter", "flip", "truncate"])
def test_a_copy_changed_on_disk_while_the_worker_runs_is_checked_again_and_fetched(tmp_path, adapter, damage):
    """Another adapter's weights copied over a checked artifact were served under its name (and a flipped
    byte failed every call as the caller's non-finite logits) until the worker restarted: a use finds the
    files changed since their check, checks them again and fetches a good copy."""
    src, sha = adapter
    other = write_adapter(tmp_path / "other", seed=1)
    remote = Remote(chunks_of(src))
    store = _store(tmp_path, remote)

    async def scenario():
        first = await store.ensure(sha)
        assert (await store.ensure(sha)).tier == "disk"  # unchanged: served from disk, no new check
        weights = first.path / "adapter_model.safetensors"
        data = bytearray(weights.read_bytes())
        if damage == "other_adapter":
            shutil.copyfile(other / "adapter_model.safetensors", weights)
        elif damage == "flip":
            data[-3] ^= 0x80
            weights.write_bytes(bytes(data))
        else:
            weights.write_bytes(bytes(data[: len(data) // 2]))
        return await asyncio.gather(*(store.ensure(sha) for _ in range(3)))

    results = asyncio.run(scenario())
    assert {r.tier for r in results} == {"remote"} and remote.calls == 2
    assert digest_dir(store.root / sha) == sha
    assert asyncio.run(store.ensure(sha)).tier == "disk"


def test_an_intact_copy_found_at_start_is_checked_once_and_served_from_disk(tmp_path, adapter):
    src, sha = adapter
    remote = Remote(chunks_of(src))
    asyncio.run(_store(tmp_path, remote).ensure(sha))
    restarted = _store(tmp_path, remote)
    checks = []
    check = restarted._check_found

    async def counted(sha256):
        checks.append(sha256)
        return await check(sha256)

    restarted._check_found = counted

    async def scenario():
        return [await restarted.ensure(sha) for _ in range(3)]

    assert {r.tier for r in asyncio.run(scenario())} == {"disk"}
    assert remote.calls == 1 and checks == [sha]


def test_a_copy_checked_while_the_worker_is_out_of_files_is_kept_not_removed(tmp_path, adapter, monkeypatch):
    """Out of file descriptors (a burst of first calls), the check of a copy found at start could not read
    it and removed it as damaged; a download then replaced its files under another request's running
    load, which failed FAILED_PRECONDITION ('cannot be read: No such file'). The check now fails as the
    overload it is (UNAVAILABLE, retry) and the copy stays to be checked again."""
    import errno

    import grpc

    from data_plane.server import artifact_store
    from data_plane.server.errors import status_for

    src, sha = adapter
    remote = Remote(chunks_of(src))
    asyncio.run(_store(tmp_path, remote).ensure(sha))
    restarted = _store(tmp_path, remote)

    def out_of_files(path):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(artifact_store, "digest_dir", out_of_files)
    with pytest.raises(OSError) as refused:
        asyncio.run(restarted.ensure(sha))
    assert status_for(refused.value)[0] == grpc.StatusCode.UNAVAILABLE
    assert restarted.path_of(sha).is_dir() and remote.calls == 1
    monkeypatch.undo()
    assert asyncio.run(restarted.ensure(sha)).tier == "disk" and remote.calls == 1


def test_a_cache_directory_that_cannot_be_written_is_an_artifact_error_not_a_fault(tmp_path, adapter):
    """A read-only (or vanished, or full) cache directory fails the fetch as ArtifactError, which callers
    answer UNAVAILABLE (retry), not INTERNAL; a PermissionError escaped before."""
    import grpc

    from data_plane.server.errors import status_for

    src, sha = adapter
    store = _store(tmp_path, Remote(chunks_of(src)))
    shutil.rmtree(store.root)
    (tmp_path / "artifacts").write_text("not a directory")  # mkdtemp inside it fails, even as root
    with pytest.raises(ArtifactError, match="cannot be written") as caught:
        asyncio.run(store.ensure(sha))
    code, message = status_for(caught.value)
    assert code == grpc.StatusCode.UNAVAILABLE and str(tmp_path) not in message


def test_a_held_copy_that_fails_its_recheck_is_replaced_in_place_not_removed(tmp_path, adapter):
    """A request holding the artifact reads its files: a failed re-check by another request must not pull
    the directory from under it; the verified download replaces the files in place."""
    src, sha = adapter
    remote = Remote(chunks_of(src))
    store = _store(tmp_path, remote)
    removed = []
    remove = store._remove
    store._remove = lambda key: (removed.append(key), remove(key))

    async def scenario():
        held = await store.ensure(sha, hold=True)
        directory_inode = held.path.stat().st_ino  # the holder's directory: the same one throughout
        weights = held.path / "adapter_model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-3] ^= 0x80
        weights.write_bytes(bytes(data))
        second = await store.ensure(sha, hold=True)
        return held, second, directory_inode

    held, second, directory_inode = asyncio.run(scenario())
    assert second.tier == "remote" and second.path == held.path
    assert held.path.stat().st_ino == directory_inode and removed == []  # replaced file by file
    assert digest_dir(held.path) == sha
    store.release([sha, sha])
    assert asyncio.run(store.ensure(sha)).tier == "disk"


def _full_disk_once(store: ArtifactStore) -> list[str]:
    """The store's next fetch fails as a full disk does; later ones run. Returns the keys it failed."""
    import errno

    real, failed = store._download_into_cache, []

    async def fill(key: str):
        if not failed:
            failed.append(key)
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real(key)

    store._download_into_cache = fill
    return failed


def _store_of_two(tmp_path: Path, adapter) -> tuple[ArtifactStore, str, str]:
    """A store whose remote serves `adapter` and a second adapter: (store, its sha, the other's sha)."""
    src, sha = adapter
    other = write_adapter(tmp_path / "other", seed=1)
    other_sha = digest_dir(other)
    chunks = {sha: chunks_of(src), other_sha: chunks_of(other)}

    async def remote(key):
        for chunk in chunks[key]:
            yield chunk

    return ArtifactStore(tmp_path / "artifacts", remote, SPEC, 64, 1 << 20), sha, other_sha


def test_a_full_disk_removes_an_idle_artifact_and_fetches_again(tmp_path, adapter):
    """Out of space while fetching (the disk is shared; the budget is only a setting), the store removes
    an artifact nobody holds and fetches once more: it answered UNAVAILABLE for every new adapter, for
    good, while idle copies filled the disk."""
    store, sha, other_sha = _store_of_two(tmp_path, adapter)

    async def scenario():
        await store.ensure(other_sha)
        failed = _full_disk_once(store)
        fetched = await store.ensure(sha)
        return failed, fetched

    failed, fetched = asyncio.run(scenario())
    assert failed == [sha] and digest_dir(fetched.path) == sha
    assert _debris(store) == [sha]  # the idle copy made room


def test_a_full_disk_with_every_artifact_held_is_an_artifact_error(tmp_path, adapter):
    store, sha, other_sha = _store_of_two(tmp_path, adapter)

    async def scenario():
        await store.ensure(other_sha, hold=True)
        _full_disk_once(store)
        await store.ensure(sha)

    with pytest.raises(ArtifactError, match="cannot be written"):
        asyncio.run(scenario())
    assert _debris(store) == [other_sha]  # a held artifact is never removed


def test_a_worker_and_a_control_plane_never_share_an_artifacts_dir(tmp_path, capsys):
    """Both keep artifacts under `STATE_DIR/artifacts` in sha256-named folders: a worker started on the
    control plane's state dir took its stored copies for its own cache and removed them to stay within
    its disk budget. Each claims the directory; the other is refused, the worker before its model loads."""
    from control_plane.artifacts.store import ArtifactStore as StoredArtifacts
    from openlora.artifact import SharedArtifactsDir, claim_artifacts_dir
    from openlora.cli import main

    control_plane_dir = tmp_path / "cp" / "artifacts"
    StoredArtifacts(control_plane_dir)
    StoredArtifacts(control_plane_dir)  # its own again: fine
    code = main(
        [
            "worker",
            "--model", str(tmp_path / "model"),
            "--state-dir", str(tmp_path / "cp"),
            "--control-plane", "127.0.0.1:1",
            "--worker-token", "t",
        ],
        environ={},
    )  # fmt: skip
    assert code == 2
    assert "holds the control-plane's artifacts: give the worker a state directory" in capsys.readouterr().err
    claim_artifacts_dir(tmp_path / "w" / "artifacts", "worker")
    with pytest.raises(SharedArtifactsDir, match="holds the worker's artifacts"):
        StoredArtifacts(tmp_path / "w" / "artifacts")


def test_weights_opened_while_out_of_file_descriptors_fail_as_overload_not_as_a_missing_file(tmp_path):
    """safetensors reports a process out of file descriptors as FileNotFoundError ("No such file or
    directory"): under a burst the engine refused sound adapters (FAILED_PRECONDITION) and dropped their
    disk copies. `open_weights` raises what really ran out; a file truly missing stays a missing file.
    Run in a child process whose descriptors are used up for real."""
    import subprocess
    import sys
    import textwrap

    path = write_adapter(tmp_path / "a") / "adapter_model.safetensors"
    script = textwrap.dedent(
        f"""
        import errno, resource, sys
        from pathlib import Path
        from data_plane.adapters.peft_reader import open_weights
        from openlora.exhaustion import exhausted_resource
        try:
            open_weights(Path({str(tmp_path / "missing")!r}))
        except FileNotFoundError:
            pass
        else:
            sys.exit("a missing file opened")
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        held = []
        try:
            while True:
                held.append(open("/dev/null"))
        except OSError:
            pass
        try:
            open_weights(Path({str(path)!r}))
        except OSError as error:
            print(error.errno == errno.EMFILE, exhausted_resource(error))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", "open", "files"]


def test_two_workers_never_share_a_state_dir(tmp_path, capsys):
    """A second `openlora worker` on a live worker's state dir (`worker`'s default `.state/worker` is
    also the one `make run` gives its worker) registered under the same worker id, released that worker's
    request id reservations at its start (so another worker could serve an id in flight) and appended to
    the same usage spool. It is refused before its model loads, naming the pid that holds the dir; once
    that one ends, the dir is free again."""
    import os

    from data_plane.server.main import StateDirInUse, lock_state_dir, unlock_state_dir
    from openlora.cli import main

    state_dir = tmp_path / "worker"
    held = lock_state_dir(state_dir)
    try:
        code = main(
            [
                "worker",
                "--model", str(tmp_path / "model"),
                "--state-dir", str(state_dir),
                "--control-plane", "127.0.0.1:1",
                "--worker-token", "t",
            ],
            environ={},
        )  # fmt: skip
        assert code == 1  # a supervisor tries again: the holder may be a worker still draining
        err = capsys.readouterr().err
        assert err.splitlines() == [
            f"error: another worker (pid {os.getpid()}) is using the state directory {state_dir}: give this "
            "one a state directory of its own (--state-dir, OPENLORA_STATE_DIR)"
        ]
        with pytest.raises(StateDirInUse):
            lock_state_dir(state_dir)
    finally:
        unlock_state_dir(state_dir, held)
    assert list(state_dir.iterdir()) == []  # the pid file went with the lock
    os.close(lock_state_dir(state_dir))  # free once its holder ends
