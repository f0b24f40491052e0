"""The artifact store: `<root>/<sha256>/` directories, written once, by atomic rename."""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from control_plane.artifacts.upload import ManifestEntry, Upload, check_manifest
from control_plane.errors import InvalidArgument, NotFound
from openlora.artifact import ARTIFACT_FILES

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
MAX_FETCH_CHUNK_BYTES = 1 << 20


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = root
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

    def publish(self, directory: Path, sha256: str) -> bool:
        """Moves a validated upload to its content address; returns False (and drops the upload) when
        identical content is already stored."""
        target = self.path_of(sha256)
        if target.is_dir():
            shutil.rmtree(directory, ignore_errors=True)
            return False
        try:
            os.rename(directory, target)
        except OSError:
            # A concurrent identical upload won the rename.
            if target.is_dir():
                shutil.rmtree(directory, ignore_errors=True)
                return False
            raise
        return True

    def remove(self, sha256: str) -> None:
        shutil.rmtree(self.path_of(sha256), ignore_errors=True)

    def files(self, sha256: str) -> list[Path]:
        directory = self.path_of(sha256)
        if not directory.is_dir():
            raise NotFound(f"artifact {sha256} not found", field="sha256")
        return [directory / name for name in sorted(ARTIFACT_FILES)]

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
