"""MergeStore: the worker's disk tier of derived (merged) adapters, `<root>/<key>/`, built on demand.

A merge is content-addressed by its spec's key (data_plane.fusion.spec): a directory under its key
always holds a complete, validated adapter. Concurrent requests for one key share one build, which runs
in a thread (never on the event loop or the engine thread). Beside each directory, `<key>.json` records
the sources' cache keys (content sha256, scoped when private), so that when a source is deleted or
replaced upstream `drop_source` finds every merge built from it (a held one is removed once its last
holder releases it).

The record also holds the merge's content digest: a merge found on disk at start is checked against it
(in a thread) before its first use, and one that changed while the worker was down is removed and built
again rather than served. Files changed while the worker runs are caught the same way: each use compares
the files' size, modification time and inode with those they had when they were built or checked (a
`stat` per file), and a merge whose files differ, or whose load failed (`suspect`), is checked again
before it is served; one that fails its check is removed at once, held or not (its holders' loads fail
rather than read it), `on_damaged(key)` lets the engine drop what it read from it, and it is built again.

The directory has a byte budget (`max_disk_bytes`): after a build takes it over, the least recently used
merges nobody holds are removed (a later request builds its merge again).

Builds are CPU-heavy and run one at a time, so a caller could queue work for everyone behind it: a build
whose every waiter went away (cancelled, deadline passed) before it started is dropped, and at most
`max_pending_builds` distinct merges may be queued or running at once. Within that, a tenant may start a
new build only while fewer than `max_pending_builds_per_tenant` of the pending builds are ones its calls
wait for, so one tenant's burst of distinct merges leaves room for the others. A build counts against
the tenants whose calls wait for it now: once a tenant's calls left, its builds no longer count for it.
Joining a build already pending is never refused (it adds no work). A refusal is MergeQueueFull
(RESOURCE_EXHAUSTED) rather than a wait behind the others. The builds queued take turns by tenant: the
next to run is the oldest of the tenant served least since the builder was last idle, so a tenant that
keeps its share full delays another's new merge by one build, not by its whole queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from data_plane.engine.errors import QueueFull
from data_plane.fusion.builder import MergeReport, MergeWriteError, build_merge
from data_plane.fusion.spec import MergeSpec
from openlora.artifact import digest_dir, files_fingerprint
from openlora.base_model import BaseModelSpec
from openlora.cache_scope import content_of

log = logging.getLogger(__name__)
_KEY = re.compile(r"^[0-9a-f]{64}$")
_TMP_PREFIX = ".partial-"
MAX_PENDING_BUILDS = 16
MAX_PENDING_BUILDS_PER_TENANT = 4
# The queue's last places (at most a quarter of it) go to tenants with no build pending: four tenants at
# their share filled it and every other tenant's new merges were refused.
RESERVED_FOR_NEW_TENANTS = 4


class MergeQueueFull(QueueFull):
    """A new merge build was refused: the worker's build queue, or the tenant's share of it, is full."""


@dataclass(frozen=True)
class LocalMerge:
    key: str
    path: Path
    # Set when this call waited for a build (its own or a concurrent one's); None when it was on disk.
    report: MergeReport | None
    wait_ms: float = 0.0  # how long this call waited for the build


class MergeStore:
    def __init__(
        self,
        root: Path,
        base: BaseModelSpec | None,
        max_rank: int,
        on_built: Callable[[MergeSpec, str, MergeReport], None] | None = None,
        max_disk_bytes: int | None = None,
        on_damaged: Callable[[str], None] | None = None,
        max_pending_builds: int = MAX_PENDING_BUILDS,
        max_pending_builds_per_tenant: int = MAX_PENDING_BUILDS_PER_TENANT,
    ) -> None:
        """`on_built(spec, key, report)` is called on the event loop after each build (metrics);
        `max_disk_bytes`: budget of the directory (None: unbounded); `on_damaged(key)`: a merge on disk
        failed its check and was removed (the engine drops its copies); `max_pending_builds`: distinct merges
        queued or building at once; `max_pending_builds_per_tenant`: of those, how many one tenant's
        calls may wait for when it asks for another."""
        if max_pending_builds < 1:
            raise ValueError(f"max_pending_builds must be >= 1, got {max_pending_builds}")
        if max_pending_builds_per_tenant < 1:
            raise ValueError(
                f"max_pending_builds_per_tenant must be >= 1, got {max_pending_builds_per_tenant}"
            )
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_rank = max_rank
        self._base = base
        # Builds run one at a time on their own thread, never on the event loop's shared pool: a burst of
        # distinct merges (each a CPU-heavy SVD per module) must not delay other requests' tokenizing and
        # artifact checks, which use that pool.
        self._builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-build")
        # Builds waiting for their turn on the builder: tenant -> (key, its turn) in arrival order; the
        # key whose turn it is; how many turns each tenant got since the builder was last idle.
        self._turns: dict[str, deque[tuple[str, asyncio.Future]]] = {}
        self._turn_holder: str | None = None
        self._turns_served: Counter[str] = Counter()
        self._on_built = on_built
        self._builds: dict[str, asyncio.Task[MergeReport]] = {}
        self._jobs: dict[str, Future] = {}  # key -> its build on the builder thread (queued or running)
        self._waiters: Counter[str] = Counter()  # key -> callers awaiting its build
        self._max_pending_builds = max_pending_builds
        self._max_pending_builds_per_tenant = max_pending_builds_per_tenant
        # tenant -> key -> that tenant's callers awaiting the key's build.
        self._tenant_waiters: dict[str, Counter[str]] = {}
        self._holds: Counter[str] = Counter()
        self._stale: set[str] = set()
        self._sources: dict[str, tuple[str, ...]] = {}  # key -> its sources' cache keys
        self._max_disk_bytes = max_disk_bytes
        self._sizes: dict[str, int] = {}  # key -> bytes on disk
        self._used_at: dict[str, float] = {}  # key -> time.monotonic() of its last use
        self._unchecked: set[str] = set()  # to check against its digest before its next use
        self._fingerprints: dict[str, tuple] = {}  # key -> its files' fingerprint when built or checked
        self._on_damaged = on_damaged
        for entry in self.root.glob(f"{_TMP_PREFIX}*"):
            shutil.rmtree(entry, ignore_errors=True)
        for entry in self.root.iterdir():
            if _KEY.fullmatch(entry.name) and entry.is_dir():
                sources = self._read_sources(entry.name)
                if sources is None:  # no record of its sources: it could never be invalidated
                    self._remove(entry.name)
                else:
                    self._sources[entry.name] = sources
                    self._unchecked.add(entry.name)
                    self._note_size(entry.name)
                    self._used_at[entry.name] = entry.stat().st_mtime - time.time() + time.monotonic()
        self._trim()

    def key_of(self, spec: MergeSpec) -> str:
        return spec.key(self.max_rank)

    def path_of(self, key: str) -> Path:
        if not _KEY.fullmatch(key):
            raise ValueError(f"malformed merge key {key!r}")
        return self.root / key

    def is_held(self, key: str) -> bool:
        return self._holds[key] > 0

    def contains(self, key: str) -> bool:
        return key in self._sources and key not in self._stale and self.path_of(key).is_dir()

    def lookup(self, spec: MergeSpec, hold: bool = False) -> LocalMerge | None:
        """The merge of `spec` when it is on disk (held until `release` when `hold`), else None."""
        key = self.key_of(spec)
        if not self.contains(key) or key in self._unchecked:
            return None
        if files_fingerprint(self.path_of(key)) != self._fingerprints.get(key):
            log.warning("merge %s changed on disk since it was checked: checking it again", key[:12])
            self._unchecked.add(key)
            return None
        if hold:
            self._holds[key] += 1
        self._used_at[key] = time.monotonic()
        return LocalMerge(key, self.path_of(key), None)

    async def build(self, spec: MergeSpec, hold: bool = False, tenant_id: str = "") -> LocalMerge:
        """Builds the merge of `spec` (whose sources carry their local paths) unless it is on disk; one
        build per key however many callers wait. `tenant_id` is the caller's tenant, whose share of the
        build queue a new build takes. Raises MergeQueueFull, or the build's error (MergeBuildError)."""
        found = self.lookup(spec, hold=hold)
        if found is not None:
            return found
        key = self.key_of(spec)
        if key in self._unchecked and self.contains(key):
            # Taken before the digest: a write during it shows as a change at the next use.
            fingerprint = files_fingerprint(self.path_of(key))
            intact = await asyncio.to_thread(self._intact, key)
            if key in self._unchecked:  # (a concurrent first use may have settled it meanwhile)
                self._unchecked.discard(key)
                if intact and fingerprint is not None:
                    self._fingerprints[key] = fingerprint
                else:
                    log.warning("merge %s on disk failed its digest check: removed, built again", key[:12])
                    self._remove(key)
                    if self._on_damaged is not None:
                        self._on_damaged(key)
            found = self.lookup(spec, hold=hold)
            if found is not None:
                return found
        if hold:
            self._holds[key] += 1
        started = time.monotonic()
        self._waiters[key] += 1
        mine = self._tenant_waiters.setdefault(tenant_id, Counter())
        mine[key] += 1
        try:
            task = self._builds.get(key)
            if task is None:
                self._check_room(tenant_id)
                task = asyncio.get_running_loop().create_task(self._build(spec, key, tenant_id))
                self._builds[key] = task
                task.add_done_callback(lambda done: self._forget_build(key, done))
            # shield: one caller going away must not cancel the build the others wait for.
            report = await asyncio.shield(task)
        except BaseException:
            if hold:
                self.release((key,))
            raise
        finally:
            mine[key] -= 1
            if mine[key] <= 0:
                del mine[key]
                if not mine:
                    del self._tenant_waiters[tenant_id]
            self._waiters[key] -= 1
            if self._waiters[key] <= 0:
                del self._waiters[key]
                self._drop_unwanted_build(key)
        return LocalMerge(key, self.path_of(key), report, (time.monotonic() - started) * 1000)

    @property
    def num_pending_builds(self) -> int:
        """Distinct merges queued or building now."""
        return len(self._builds)

    def pending_builds_of(self, tenant_id: str) -> int:
        """How many pending (queued or running) builds the calls of `tenant_id` wait for now."""
        return sum(1 for key in self._tenant_waiters.get(tenant_id, ()) if key in self._builds)

    def _check_room(self, tenant_id: str) -> None:
        """Raises MergeQueueFull when a new build of `tenant_id` would pass its share or the worker's cap."""
        mine = self.pending_builds_of(tenant_id)
        if mine >= self._max_pending_builds_per_tenant:
            raise MergeQueueFull(
                f"this tenant already waits for {mine} merge builds, the most one tenant may have pending "
                f"(a per-tenant limit of {self._max_pending_builds_per_tenant}); retry once one has been "
                "built, or ask for a merge already built"
            )
        if len(self._builds) >= self._max_pending_builds:
            raise MergeQueueFull(
                f"{len(self._builds)} merges are waiting to be built, the most this worker queues "
                f"(a limit of {self._max_pending_builds} for all tenants); retry later"
            )
        reserved = min(RESERVED_FOR_NEW_TENANTS, self._max_pending_builds // 4)
        if mine > 0 and len(self._builds) >= self._max_pending_builds - reserved:
            raise MergeQueueFull(
                f"{len(self._builds)} merges are waiting to be built and the last {reserved} places are "
                "kept for tenants with none pending; retry once one of this tenant's has been built"
            )

    async def _take_turn(self, key: str, tenant_id: str) -> None:
        """Waits until the builder is this build's (`_give_turn`)."""
        turn = asyncio.get_running_loop().create_future()
        self._turns.setdefault(tenant_id, deque()).append((key, turn))
        self._give_turn()
        try:
            await turn
        except asyncio.CancelledError:
            queue = self._turns.get(tenant_id)
            if queue is not None and (key, turn) in queue:
                queue.remove((key, turn))
                if not queue:
                    del self._turns[tenant_id]
            self._end_turn(key)  # a turn given as it was cancelled passes on
            raise

    def _give_turn(self) -> None:
        """When the builder is free, gives it to the oldest queued build of the tenant served least."""
        while self._turn_holder is None:
            if not self._turns:
                self._turns_served.clear()  # idle: the next burst starts even
                return
            tenant = min(self._turns, key=lambda t: self._turns_served[t])  # ties: the first queued
            queue = self._turns[tenant]
            key, turn = queue.popleft()
            if not queue:
                del self._turns[tenant]
            if turn.done():  # cancelled while it waited; its task has not run its handler yet
                continue
            self._turns_served[tenant] += 1
            self._turn_holder = key
            turn.set_result(None)

    def _end_turn(self, key: str) -> None:
        if self._turn_holder == key:
            self._turn_holder = None
            self._give_turn()

    def _drop_unwanted_build(self, key: str) -> None:
        """Nobody waits for `key` any more: its build is dropped if it has not started on the builder thread
        (one already running completes and is kept, as its work is done)."""
        task = self._builds.get(key)
        if task is None or task.done():
            return
        job = self._jobs.get(key)
        # No job yet: the task has not run its first step, so cancelling it starts nothing.
        if job is None or job.cancel():
            task.cancel()
            del self._builds[key]  # a new request for the key starts a fresh build

    def _forget_build(self, key: str, done: asyncio.Task) -> None:
        if self._builds.get(key) is done:
            del self._builds[key]

    def release(self, keys: Iterable[str]) -> None:
        """Ends one hold of each merge."""
        for key in keys:
            self._holds[key] -= 1
            if self._holds[key] <= 0:
                del self._holds[key]
        for key in list(self._stale):
            if not self._holds[key]:
                self._remove(key)

    def suspect(self, key: str) -> None:
        """A load of the merge `key` failed: its files are checked against its digest before its next use
        (removed and built again when they fail), even where their size and times did not change."""
        if key in self._sources:
            self._unchecked.add(key)

    def drop_source(self, sha256: str) -> list[str]:
        """Forgets every merge built from the content `sha256`, in any scope (deleted or replaced
        upstream); returns their keys (for the engine to drop them from its tiers). A held merge is
        removed on release."""
        return self._drop_where(lambda sources: sha256 in map(content_of, sources))

    def drop_source_key(self, source_key: str) -> list[str]:
        """`drop_source` for the merges built from the one cache key `source_key` of a content."""
        return self._drop_where(lambda sources: source_key in sources)

    def _drop_where(self, built_from) -> list[str]:
        dropped = [key for key, sources in self._sources.items() if built_from(sources)]
        for key in dropped:
            if self._holds[key]:
                self._stale.add(key)
            else:
                self._remove(key)
        return dropped

    async def _build(self, spec: MergeSpec, key: str, tenant_id: str) -> MergeReport:
        await self._take_turn(key, tenant_id)  # CancelledError when dropped while it waits
        try:
            job = self._builder.submit(build_merge, spec, self.path_of(key), self.max_rank, self._base)
            self._jobs[key] = job
            report = await asyncio.wrap_future(job)  # CancelledError when dropped before it started
        finally:
            self._jobs.pop(key, None)
            self._end_turn(key)
        fingerprint = files_fingerprint(self.path_of(key))  # before the digest, as in a check
        self._write_sources(key, spec, await asyncio.to_thread(digest_dir, self.path_of(key)))
        if fingerprint is not None:
            self._fingerprints[key] = fingerprint
        self._stale.discard(key)
        self._note_size(key)
        self._used_at[key] = time.monotonic()
        log.info(
            "merge %s built: %s of %d sources, density %g, rank %d, %d modules, truncation error %.4g "
            "(relative Frobenius; worst module %.4g), %.0f ms",
            key[:12],
            spec.method,
            len(spec.sources),
            spec.density,
            report.rank,
            report.num_modules,
            report.relative_error,
            report.max_module_error,
            report.build_ms,
        )
        if self._on_built is not None:
            self._on_built(spec, key, report)
        self._trim(keep=key)
        return report

    @property
    def used_bytes(self) -> int:
        return sum(self._sizes.values())

    def _note_size(self, key: str) -> None:
        path = self.path_of(key)
        self._sizes[key] = sum(f.stat().st_size for f in path.iterdir() if f.is_file())

    def _trim(self, keep: str | None = None) -> None:
        """Removes least recently used merges nobody holds (nor builds, nor `keep`, just built for its
        waiters) until the directory fits its budget."""
        if self._max_disk_bytes is None:
            return
        used = self.used_bytes
        for key in sorted(self._sizes, key=lambda k: self._used_at.get(k, 0.0)):
            if used <= self._max_disk_bytes:
                return
            if key == keep or self._holds[key] or key in self._builds:
                continue
            used -= self._sizes[key]
            log.info("merge disk budget: removing merge %s (%d bytes)", key[:12], self._sizes[key])
            self._remove(key)

    def _record_path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def _write_sources(self, key: str, spec: MergeSpec, digest: str) -> None:
        sources = tuple(s.key for s in spec.sources)
        record = {"sources": list(sources), "spec": json.loads(spec.canonical_json()), "digest": digest}
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=self.root)
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            os.replace(tmp, self._record_path(key))
        except OSError as error:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise MergeWriteError(error.strerror or str(error)) from error
        self._sources[key] = sources

    def _intact(self, key: str) -> bool:
        """Whether the merge's files still have the digest recorded when it was built."""
        try:
            return json.loads(self._record_path(key).read_text())["digest"] == digest_dir(self.path_of(key))
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def _read_sources(self, key: str) -> tuple[str, ...] | None:
        try:
            record = json.loads(self._record_path(key).read_text())
            return tuple(str(s) for s in record["sources"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _remove(self, key: str) -> None:
        path = self.path_of(key)
        self._stale.discard(key)
        self._unchecked.discard(key)
        self._sources.pop(key, None)
        self._fingerprints.pop(key, None)
        self._sizes.pop(key, None)
        self._used_at.pop(key, None)
        if path.is_dir():
            # Renamed first so that nobody sees a half-deleted directory under the key.
            doomed = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=self.root))
            os.replace(path, doomed / "gone")
            shutil.rmtree(doomed, ignore_errors=True)
        self._record_path(key).unlink(missing_ok=True)
