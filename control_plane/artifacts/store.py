"""The artifact store: `<root>/<sha256>/` directories, written once, by atomic rename.

Files can still change on disk after they were written (a bad disk, an operator's mistake). A stored copy
is checked against its digest before it is first served (again whenever its files' size or mtime change):
a damaged one is logged and refused with DATA_LOSS, never streamed to a worker that would only refuse it
in turn. An upload of the same content repairs it: publish checks the copy in place and replaces it when
it no longer matches, instead of keeping it as "already stored".

Content is stored once whoever uploads it, but how long an upload or a fetch takes must not tell a tenant
that someone else holds (or serves) the same bytes: an upload of content the uploader does not hold yet
puts its own verified files in place without reading the stored copy (a digest of it made such an upload
slower than one of new bytes), and every publish records its files as verified, so a tenant's first fetch
after its upload never skips (or pays for) a digest because of another tenant's fetches."""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

from control_plane.artifacts.upload import ManifestEntry, Upload, check_manifest
from control_plane.errors import InvalidArgument, NotFound
from openlora.artifact import ARTIFACT_FILES, claim_artifacts_dir, digest_dir

log = logging.getLogger(__name__)

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
MAX_FETCH_CHUNK_BYTES = 1 << 20


class ArtifactDamaged(Exception):
    """A stored artifact's files no longer match its digest: DATA_LOSS (re-uploading the adapter repairs
    it). A fault of the store, not of the caller."""

    def __init__(self, sha256: str, actual: str) -> None:
        super().__init__(
            f"the control plane's stored copy of artifact {sha256[:12]} is damaged (its files digest to "
            f"{actual[:12]}); upload the adapter again to repair it"
        )


class ArtifactMissing(ArtifactDamaged):
    """An artifact an adapter of the registry points at is not in the store (its directory was removed,
    or the store restored from an older backup): DATA_LOSS, as a damaged one, not NOT_FOUND (the worker
    told its caller the adapter's name did not exist)."""

    def __init__(self, sha256: str) -> None:
        Exception.__init__(
            self,
            f"the control plane's stored copy of artifact {sha256[:12]} is missing; upload the adapter again "
            "to restore it",
        )
        self.sha256 = sha256


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        claim_artifacts_dir(root, "control-plane")
        self.root = root
        # sha256 -> the (size, mtime_ns) of each file when the copy last matched its digest.
        self._verified: dict[str, tuple[tuple[int, int], ...]] = {}
        self._verified_lock = threading.Lock()
        self.tmp_root = root / ".tmp"
        self.tmp_root.mkdir(parents=True, exist_ok=True)
        # Temporary directories of uploads cut short by a crash are garbage now.
        for stale in self.tmp_root.iterdir():
            shutil.rmtree(stale, ignore_errors=True)

    def begin_upload(self, manifest: list[ManifestEntry], max_size_bytes: int) -> Upload:
        return Upload(self.tmp_root / uuid.uuid4().hex, check_manifest(manifest, max_size_bytes))

    def path_of(self, sha256: str) -> Path:
        if not SHA256_HEX.fullmatch(sha256):
            raise InvalidArgument("must be 64 lowercase hex digits", field="sha256")
        return self.root / sha256

    def publish(self, directory: Path, sha256: str, check_stored: bool = True) -> bool:
        """Moves a validated upload (`directory`, whose files digest to `sha256`) to its content address;
        returns False (and drops the upload) when identical content is already stored. `check_stored`
        False: the uploader does not hold this content, so a stored copy is not read (its digest would
        take as long as the content is large, telling the uploader that someone stored it): the upload's
        files take its place, the same bytes, which also repairs a damaged copy."""
        target = self.path_of(sha256)
        if target.is_dir() and not check_stored:
            for name in ARTIFACT_FILES:  # one rename each, as a new upload's one: a reader sees either copy
                os.replace(directory / name, target / name)
            shutil.rmtree(directory, ignore_errors=True)
            self._remember(sha256, target)
            return False
        if target.is_dir():
            actual = self._digest(target)
            if actual == sha256:
                shutil.rmtree(directory, ignore_errors=True)
                self._remember(sha256, target)
                return False
            log.error(
                "stored artifact %s no longer matches its digest (%s): replaced by this upload of it",
                sha256,
                actual,
            )
            broken = self.tmp_root / f"broken-{uuid.uuid4().hex}"
            os.rename(target, broken)
            shutil.rmtree(broken, ignore_errors=True)
            self._forget(sha256)
        try:
            os.rename(directory, target)
        except OSError:
            # A concurrent identical upload won the rename.
            if target.is_dir():
                shutil.rmtree(directory, ignore_errors=True)
                return False
            raise
        self._remember(sha256, target)
        return True

    def remove(self, sha256: str) -> None:
        shutil.rmtree(self.path_of(sha256), ignore_errors=True)
        self._forget(sha256)

    def files(self, sha256: str) -> list[Path]:
        """The artifact's files in name order, once its copy is known to match its digest (checked again
        when a file's size or mtime changed); raises ArtifactDamaged (logged) when it does not."""
        directory = self.path_of(sha256)
        if not directory.is_dir():
            raise NotFound(f"artifact {sha256} not found", field="sha256")
        paths = [directory / name for name in sorted(ARTIFACT_FILES)]
        try:
            signature = tuple((stat.st_size, stat.st_mtime_ns) for stat in map(os.stat, paths))
        except FileNotFoundError:
            raise ArtifactDamaged(sha256, "missing files") from None
        with self._verified_lock:
            if self._verified.get(sha256) == signature:
                return paths
        actual = self._digest(directory)
        if actual != sha256:
            log.error("stored artifact %s no longer matches its digest (%s); not served", sha256, actual)
            raise ArtifactDamaged(sha256, actual)
        with self._verified_lock:
            self._verified[sha256] = signature
        return paths

    @staticmethod
    def _digest(directory: Path) -> str:
        try:
            return digest_dir(directory)
        except FileNotFoundError:
            return "missing files"

    def _remember(self, sha256: str, directory: Path) -> None:
        """Records the files of `directory`, known to digest to `sha256`, as verified."""
        try:
            signature = tuple(
                (stat.st_size, stat.st_mtime_ns)
                for stat in (os.stat(directory / name) for name in sorted(ARTIFACT_FILES))
            )
        except FileNotFoundError:
            return
        with self._verified_lock:
            self._verified[sha256] = signature

    def _forget(self, sha256: str) -> None:
        with self._verified_lock:
            self._verified.pop(sha256, None)

    @staticmethod
    def read_chunks(path: Path, chunk_bytes: int = MAX_FETCH_CHUNK_BYTES) -> Iterator[tuple[int, bytes]]:
        """(offset, data) pieces of a file, at most `chunk_bytes` each; an empty file yields one piece."""
        with open(path, "rb") as f:
            offset = 0
            while True:
                data = f.read(chunk_bytes)
                if not data and offset:
                    return
                yield offset, data
                offset += len(data)
                if not data:
                    return
