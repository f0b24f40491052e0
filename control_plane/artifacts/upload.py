"""One upload in flight: chunks written under a temporary directory, checked against the manifest as
they stream (never buffered), so a bad or truncated upload is refused before anything is published."""

from __future__ import annotations

import hashlib
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from control_plane.errors import InvalidArgument
from openlora.adapter_format import MAX_CONFIG_BYTES
from openlora.artifact import ARTIFACT_FILES, CONFIG_FILE
from openlora.text_rules import quoted

_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


@dataclass(frozen=True)
class ManifestEntry:
    filename: str
    size_bytes: int
    # Lowercase hex sha256 of the file; "" when not given.
    sha256: str = ""


def check_filename(filename: str) -> None:
    """Only the two PEFT files, by exact name: no paths, no `..`, no pickles."""
    if filename not in ARTIFACT_FILES:
        if "/" in filename or "\\" in filename or ".." in filename:
            reason = f"{quoted(filename)} is a path; send bare file names"
        else:
            reason = (
                f"{quoted(filename)} is not allowed; an adapter holds only {' and '.join(ARTIFACT_FILES)}"
            )
        raise InvalidArgument(reason, field="filename")


def check_manifest(entries: list[ManifestEntry], max_size_bytes: int) -> dict[str, ManifestEntry]:
    by_name: dict[str, ManifestEntry] = {}
    for i, entry in enumerate(entries):
        check_filename(entry.filename)
        if entry.sha256 and not _SHA256_HEX.fullmatch(entry.sha256):
            # Refused with the header, not once every byte arrived ("does not match its declared sha256").
            raise InvalidArgument(
                f"{quoted(entry.filename)}: must be 64 hexadecimal digits, or empty",
                field=f"files[{i}].sha256",
            )
        if entry.filename in by_name:
            raise InvalidArgument(f"{quoted(entry.filename)} listed twice", field="files")
        limit = MAX_CONFIG_BYTES if entry.filename == CONFIG_FILE else max_size_bytes
        if entry.size_bytes > limit:
            raise InvalidArgument(
                f"{quoted(entry.filename)} declares {entry.size_bytes} bytes; the limit is {limit}",
                field="files",
            )
        by_name[entry.filename] = entry
    missing = [name for name in ARTIFACT_FILES if name not in by_name]
    if missing:
        raise InvalidArgument(f"must list {' and '.join(ARTIFACT_FILES)}; missing {missing}", field="files")
    if sum(e.size_bytes for e in by_name.values()) > max_size_bytes:
        raise InvalidArgument(f"total size exceeds the limit of {max_size_bytes} bytes", field="files")
    return by_name


class Upload:
    """Receives the files of one manifest into `directory`; `abort()` removes everything."""

    def __init__(self, directory: Path, manifest: dict[str, ManifestEntry]) -> None:
        self.directory = directory
        self._manifest = manifest
        self._written_bytes = dict.fromkeys(manifest, 0)
        self._hashes = {name: hashlib.sha256() for name in manifest}
        self._files: dict[str, BinaryIO] = {}
        directory.mkdir(parents=True)

    def write(self, filename: str, offset: int, data: bytes) -> None:
        check_filename(filename)
        if filename not in self._manifest:
            raise InvalidArgument(f"{quoted(filename)} is not in the manifest", field="filename")
        written = self._written_bytes[filename]
        if offset != written:
            raise InvalidArgument(
                f"{quoted(filename)}: chunk at offset {offset}, expected {written}", field="offset"
            )
        if written + len(data) > self._manifest[filename].size_bytes:
            raise InvalidArgument(
                f"{quoted(filename)} is longer than its declared {self._manifest[filename].size_bytes} bytes",
                field="data",
            )
        f = self._files.get(filename)
        if f is None:
            f = self._files[filename] = open(self.directory / filename, "wb")  # noqa: SIM115
        f.write(data)
        self._hashes[filename].update(data)
        self._written_bytes[filename] = written + len(data)

    def _close_all(self) -> None:
        """Closes every file, each whatever the others did (a close flushes, and fails on a full disk);
        raises the first failure once all are closed."""
        first: OSError | None = None
        for f in self._files.values():
            try:
                f.close()
            except OSError as error:
                first = first or error
        if first is not None:
            raise first

    def finish(self) -> Path:
        """Checks every file arrived whole (and matches its declared sha256); returns the directory."""
        self._close_all()
        for name, entry in self._manifest.items():
            if self._written_bytes[name] != entry.size_bytes:
                raise InvalidArgument(
                    f"{name!r} is truncated: received {self._written_bytes[name]} of {entry.size_bytes} bytes",
                    field="files",
                )
            if entry.sha256 and entry.sha256.lower() != self._hashes[name].hexdigest():
                raise InvalidArgument(f"{name!r} does not match its declared sha256", field="files")
            (self.directory / name).touch()  # a declared empty file still exists
        return self.directory

    def abort(self) -> None:
        """Closes every file and removes the directory, whatever fails on the way (a full disk fails the
        closes, and a handle left open kept the space taken until the process ended)."""
        try:
            self._close_all()
        except OSError:
            pass
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)
