"""The worker's local disk cache of adapter artifacts: `<state>/artifacts/<key>/`.

Artifacts are kept by cache key (openlora/cache_scope.py): the content's sha256 for public content,
`<sha256>-<scope>` for a private adapter's, so that one tenant's identical private content is never found
on disk by another tenant's first call (two scopes of one content are two copies). Below, "sha256" of a
key means the content it names (`content_of`).

A missing artifact is streamed from the control plane into a private temporary directory, checked
against its sha256 (openlora.artifact) and the PEFT validator, and only then renamed into place, so a
directory under its key always holds a verified adapter. A corrupt or partial download is deleted and
never loaded. Concurrent requests for the same key share one download.

The directory has a byte budget (`max_disk_bytes`): when a download takes it over, artifacts that nobody
holds (`ensure(..., hold=True)` until `release`) and the engine is not reading (`busy`) are removed until
it fits again: first those this worker has not served in the last `served_window_s` (a day; fetched by a
prefetch and never used, or served long ago), least recently used first, and only then recently served
ones, least recently used first. So the control plane is never on the path of an adapter served in the
last day while the budget holds them all (a prefetch never pushes one out). Serving is an `ensure` with
`hold` (a request's stream); artifacts found on disk at start count as served when last modified. An
artifact in use is never removed; the budget may be exceeded while everything is in use.

An artifact found on disk at start is checked against its sha256 at its first use (validated when fetched),
before it is served: files changed while the worker was down (a flipped byte, a truncated write, an
edit) are removed and fetched afresh instead of being served silently wrong. Concurrent first uses share
one check. Files changed while it runs are caught the same way: each use compares the files' size,
modification time and inode with those they had when they were checked (a `stat` per file), and a copy
that differs is checked again (another adapter's weights copied over it were served under its name).

`discard` (deleted or replaced upstream) never pulls files from under a holder: a held artifact is marked
stale and removed when the last hold is released (a request's adapter load reads the files its stream
holds; an unheld prefetch that loses its files fails alone, and the engine drops it). A stale artifact
is never served again: `ensure` fetches it afresh, and the verified download replaces the stale files in
place, file by file (the same bytes, as they have the same sha256), so a holder's path stays valid.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from openlora.adapter_format import AdapterFormatError, validate_adapter_dir
from openlora.artifact import ARTIFACT_FILES, ArtifactDigest, digest_dir, files_fingerprint
from openlora.base_model import BaseModelSpec
from openlora.cache_scope import content_of, is_cache_key
from openlora.exhaustion import exhausted_resource

log = logging.getLogger(__name__)

_TMP_PREFIX = ".partial-"
MAX_DEFAULT_DISK_BYTES = 20 << 30
SERVED_WINDOW_S = 86_400.0  # an artifact served within this long is kept ahead of unserved ones

# Streams FetchArtifactResponse-like chunks (filename on a file's first chunk, offset, data,
# file_size_bytes) of one artifact.
Fetcher = Callable[[str], AsyncIterator]


def default_disk_cache_bytes(root: Path) -> int:
    """A quarter of the free space where the artifacts live, at most 20 GiB: the disk tier's default."""
    probe = Path(root)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        free = 4 * MAX_DEFAULT_DISK_BYTES
    return min(free // 4, MAX_DEFAULT_DISK_BYTES)


async def _shared(tasks: dict[str, asyncio.Task], key: str, start: Callable[[str], Awaitable]):
    """The result of `start(key)`, run once however many callers wait (its task lives in `tasks` while it
    runs); shielded: one caller going away must not cancel the work the others wait for."""
    task = tasks.get(key)
    if task is None:
        task = asyncio.get_running_loop().create_task(start(key))
        tasks[key] = task
        task.add_done_callback(lambda _t: tasks.pop(key, None))
    return await asyncio.shield(task)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


class ArtifactError(Exception):
    """An artifact could not be brought to local disk: the download failed or did not verify."""


class ArtifactRejected(ArtifactError):
    """The artifact verified but this worker refuses it (shape, rank or size); `field` says why."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class LocalArtifact:
    key: str  # its cache key
    path: Path
    # "disk" when it was already here, "remote" when this call fetched it.
    tier: str


class ArtifactStore:
    def __init__(
        self,
        root: Path,
        fetch: Fetcher,
        spec: BaseModelSpec | None,
        max_rank: int,
        max_size_bytes: int,
        max_disk_bytes: int | None = None,
        busy: Callable[[str], bool] | None = None,
        served_window_s: float = SERVED_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`max_disk_bytes`: budget of the directory (None: unbounded); `busy(key)`: True while the
        engine may still read that artifact from disk (a load in flight), so it is not removed;
        `served_window_s`: how long a served artifact is kept ahead of unserved ones."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._fetch = fetch
        self._spec = spec
        self._max_rank = max_rank
        self._max_size_bytes = max_size_bytes
        self._downloads: dict[str, asyncio.Task[Path]] = {}
        self._max_disk_bytes = max_disk_bytes
        self._busy = busy or (lambda _sha256: False)
        self._holds: Counter[str] = Counter()
        self._clock = clock
        self._served_window_s = served_window_s
        self._used_at: dict[str, float] = {}  # key -> clock() of its last ensure
        # key -> clock() of its last serving (outlives the files, so a re-fetch is still "served")
        self._served_at: dict[str, float] = {}
        self._sizes: dict[str, int] = {}  # key -> bytes on disk
        self._stale: set[str] = set()  # discarded while in use: never served, removed once unused
        # Found on disk at start and not checked yet (the first ensure checks it; one check per key).
        self._unchecked: set[str] = set()
        self._checks: dict[str, asyncio.Task[bool]] = {}
        # key -> the files' (size, mtime, inode) when they were last checked or written
        self._fingerprints: dict[str, tuple | None] = {}
        self._remove_partials()
        for entry in self.root.iterdir():
            if is_cache_key(entry.name) and entry.is_dir():
                self._unchecked.add(entry.name)
                self._sizes[entry.name] = _dir_bytes(entry)
                # Its age by the wall clock, on this clock; written "in the future" (before the clock
                # stepped back), it counts as written now, not as served until the clock gets there.
                modified_at = self._clock() - max(0.0, time.time() - entry.stat().st_mtime)
                self._used_at[entry.name] = self._served_at[entry.name] = modified_at
        self._trim()

    def path_of(self, key: str) -> Path:
        if not is_cache_key(key):
            raise ArtifactError(f"malformed artifact key {key!r}")
        return self.root / key

    def keys_of(self, sha256: str) -> list[str]:
        """The keys on disk (or being fetched) whose content is `sha256`, in every scope."""
        known = set(self._sizes) | set(self._downloads) | set(self._holds)
        return sorted(k for k in known if content_of(k) == sha256)

    def contains(self, key: str) -> bool:
        """True when `ensure` would serve the artifact from disk (present and not stale)."""
        return self.path_of(key).is_dir() and key not in self._stale

    @property
    def used_bytes(self) -> int:
        return sum(self._sizes.values())

    def is_held(self, key: str) -> bool:
        return self._holds[key] > 0

    async def ensure(self, key: str, hold: bool = False) -> LocalArtifact:
        """The local directory of an artifact, fetched and verified first when it is not on disk.
        `hold`: the artifact is in use (never removed by the disk budget) until `release(key)`."""
        path = self.path_of(key)
        self._remove_stale()
        self._used_at[key] = self._clock()
        if hold:
            self._holds[key] += 1
            self._served_at[key] = self._used_at[key]
        try:
            if key not in self._stale and await self._checked(key, path):
                return LocalArtifact(key, path, "disk")
            return LocalArtifact(key, await _shared(self._downloads, key, self._download), "remote")
        except BaseException:
            if hold:
                self.release((key,))
            raise

    async def _checked(self, key: str, path: Path) -> bool:
        """True when the artifact on disk may be served: checked already and its files as they were then
        (one `stat` per file, the only system calls of a call for an adapter on disk: each gives up the
        interpreter to the engine thread), or checked now (found at start, or changed since). A copy that
        fails its check is removed, and one not on disk is not served (False: the caller fetches it)."""
        if key not in self._unchecked:
            fingerprint = files_fingerprint(path)
            if fingerprint is not None and self._fingerprints.get(key) == fingerprint:
                return True
        if not path.is_dir():
            return False  # not on disk
        if key not in self._unchecked:
            log.warning("artifact %s changed on disk since it was checked: checking it again", key[:12])
            self._unchecked.add(key)
        return await _shared(self._checks, key, self._check_found)

    async def _check_found(self, key: str) -> bool:
        """Whether a copy found at start, or changed since its check, still has its content digest (it was
        validated when fetched); one that does not, or cannot be read, is removed (marked stale while
        anyone holds it: its download replaces the files in place)."""
        # Taken before the digest: a write during it shows as a change at the next use.
        fingerprint = files_fingerprint(self.path_of(key))
        try:
            actual = await asyncio.to_thread(digest_dir, self.path_of(key))
            reason = f"content digest {actual[:12]}"
        except (OSError, ValueError) as error:
            if exhausted_resource(error):
                # Out of file descriptors or memory: the worker is overloaded, the copy may be sound. It was
                # removed as damaged (and its download replaced the files under a holder's running load).
                raise
            actual, reason = None, f"unreadable: {error}"
        self._unchecked.discard(key)
        if actual == content_of(key) and fingerprint is not None:
            self._fingerprints[key] = fingerprint
            return True
        log.warning("artifact %s on disk failed its check (%s): removed, fetched again", key[:12], reason)
        if self.is_held(key):
            self._stale.add(key)
        else:
            self._remove(key)
        return False

    def release(self, keys: Iterable[str]) -> None:
        """Ends one hold of each artifact (taken by `ensure(..., hold=True)`)."""
        for key in keys:
            self._holds[key] -= 1
            if self._holds[key] <= 0:
                del self._holds[key]
        self._remove_stale()
        self._trim()

    def is_stale(self, key: str) -> bool:
        """True while a discarded artifact waits for its last holder before it is removed."""
        return key in self._stale

    def discard(self, key: str) -> None:
        """Forgets an artifact (deleted or replaced upstream); a later ensure fetches it again. A held
        one is only marked stale, and removed when its last hold is released."""
        path = self.path_of(key)
        if self.is_held(key):
            if path.is_dir():
                self._stale.add(key)
            return
        self._remove(key)

    def _remove_stale(self) -> None:
        """Removes the stale artifacts nobody holds any more."""
        for key in list(self._stale):
            if not self.is_held(key):
                self._remove(key)

    def _remove(self, key: str) -> None:
        """Deletes an artifact's directory now (the caller checked that nobody uses it)."""
        path = self.path_of(key)
        self._stale.discard(key)
        if path.is_dir():
            # Rename first so a concurrent reader never sees a half-deleted directory under the sha.
            doomed = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=self.root))
            os.replace(path, doomed / "gone")
            shutil.rmtree(doomed, ignore_errors=True)
        self._sizes.pop(key, None)
        self._used_at.pop(key, None)
        self._fingerprints.pop(key, None)

    def served_recently(self, key: str) -> bool:
        """True when this worker served the artifact within the last `served_window_s`."""
        served_at = self._served_at.get(key)
        return served_at is not None and self._clock() - served_at <= self._served_window_s

    def _trim(self) -> None:
        """Removes artifacts not in use, unserved ones first, least recently used first within each, until
        the directory fits its budget."""
        now = self._clock()
        for key in [k for k, t in self._served_at.items() if now - t > self._served_window_s]:
            del self._served_at[key]
        if self._max_disk_bytes is None:
            return
        used = self.used_bytes
        order = sorted(self._sizes, key=lambda k: (self.served_recently(k), self._used_at.get(k, 0.0)))
        for key in order:
            if used <= self._max_disk_bytes:
                return
            if self.is_held(key) or key in self._downloads or self._busy(key):
                continue
            used -= self._sizes[key]
            log.info("disk budget: removing artifact %s (%d bytes)", key[:12], self._sizes[key])
            self._remove(key)

    async def _download(self, key: str) -> Path:
        """Fetches, verifies and publishes an artifact. The file system running out of space first makes
        room (artifacts nobody holds, as the budget trims them) and tries once more: the budget is a
        setting, the disk is shared, and a full disk with idle artifacts on it refused every new adapter
        for good. The cache directory failing otherwise (read-only, removed), or still out of space, is an
        ArtifactError (UNAVAILABLE: retry, here or elsewhere), logged with the path."""
        try:
            try:
                return await self._download_into_cache(key)
            except OSError as error:
                if error.errno not in (errno.ENOSPC, errno.EDQUOT) or not self._make_room(key):
                    raise
                return await self._download_into_cache(key)
        except OSError as error:
            log.warning("artifact %s: the cache at %s cannot be written: %s", key[:12], self.root, error)
            raise ArtifactError(
                f"artifact {key[:12]}: the worker's artifact cache cannot be written ({error.strerror})"
            ) from error

    def _make_room(self, key: str) -> bool:
        """Out of space while fetching `key`: removes artifacts not in use (unserved ones first, least
        recently used first) until twice the largest artifact known here is freed, or none is left to
        remove. True when anything was removed."""
        wanted = 2 * max(self._sizes.values(), default=0)
        freed = 0
        order = sorted(self._sizes, key=lambda k: (self.served_recently(k), self._used_at.get(k, 0.0)))
        for other in order:
            if freed >= wanted and freed > 0:
                break
            if other == key or self.is_held(other) or other in self._downloads or self._busy(other):
                continue
            freed += self._sizes[other]
            log.warning(
                "disk full: removing artifact %s (%d bytes) to fetch %s",
                other[:12],
                self._sizes[other],
                key[:12],
            )
            self._remove(other)
        return freed > 0

    async def _download_into_cache(self, key: str) -> Path:
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{key[:12]}-", dir=self.root))
        try:
            await self._receive(key, tmp)
            await asyncio.to_thread(self._verify, key, tmp)
            final = self.root / key
            if final.is_dir():
                # A stale copy a holder still reads (or another process's copy): same key, same bytes.
                # Replace it file by file, each rename atomic, so its path never stops holding an adapter.
                for name in ARTIFACT_FILES:
                    os.replace(tmp / name, final / name)
            else:
                try:
                    os.rename(tmp, final)
                except OSError:
                    if not final.is_dir():  # lost a race with another process: theirs is as good
                        raise
            self._stale.discard(key)
            self._unchecked.discard(key)
            self._fingerprints[key] = files_fingerprint(final)
            self._sizes[key] = _dir_bytes(final)
            self._trim()
            return final
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    async def _receive(self, key: str, tmp: Path) -> None:
        sizes: dict[str, int] = {}
        written: dict[str, int] = {}
        current: str | None = None
        handle = None
        try:
            async for chunk in self._fetch(content_of(key)):
                if chunk.filename and chunk.filename != current:
                    if chunk.filename not in ARTIFACT_FILES or chunk.filename in sizes:
                        raise ArtifactError(f"artifact {key[:12]}: unexpected file {chunk.filename!r}")
                    if handle is not None:
                        handle.close()
                    current = chunk.filename
                    sizes[current] = chunk.file_size_bytes
                    written[current] = 0
                    handle = open(tmp / current, "wb")  # noqa: SIM115 (closed in finally)
                if current is None or handle is None:
                    raise ArtifactError(f"artifact {key[:12]}: data before a file name")
                if chunk.offset != written[current]:
                    raise ArtifactError(f"artifact {key[:12]}: {current} chunk out of order")
                written[current] += len(chunk.data)
                if written[current] > sizes[current] or written[current] > self._max_size_bytes:
                    raise ArtifactError(f"artifact {key[:12]}: {current} longer than declared")
                handle.write(chunk.data)
        finally:
            if handle is not None:
                handle.close()
        for name in ARTIFACT_FILES:
            if name not in sizes or written[name] != sizes[name]:
                raise ArtifactError(f"artifact {key[:12]}: {name} incomplete")

    def _verify(self, key: str, tmp: Path) -> None:
        """Checks a download's content against `key` and the PEFT validator, each file fsynced (durable
        before the rename publishes the directory under its key)."""
        digest = ArtifactDigest()
        for name in sorted(ARTIFACT_FILES):
            file_path = tmp / name
            digest.begin_file(name, file_path.stat().st_size)
            with open(file_path, "rb") as f:
                while data := f.read(1 << 20):
                    digest.update(data)
                os.fsync(f.fileno())
        actual = digest.hexdigest()
        if actual != content_of(key):
            log.error("artifact %s: the download digests to %s; not kept", content_of(key), actual)
            raise ArtifactError(f"artifact {key[:12]}: content digest {actual[:12]} does not match")
        try:
            validate_adapter_dir(tmp, self._spec, self._max_rank, self._max_size_bytes)
        except AdapterFormatError as error:
            raise ArtifactRejected(error.field, error.reason) from None

    def _remove_partials(self) -> None:
        for entry in self.root.glob(f"{_TMP_PREFIX}*"):
            shutil.rmtree(entry, ignore_errors=True)
