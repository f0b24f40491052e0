"""Content addressing of adapter artifacts.

An artifact is the pair of files of a PEFT LoRA directory. Its address is the sha256 of a canonical
framing of the files, so the control plane, its storage and every worker agree on one digest without
archiving the directory:

    for name in sorted(files): sha256.update(name, 0x00, len(file) as 8 bytes big-endian, file bytes)
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ARTIFACT_FILES: tuple[str, ...] = (CONFIG_FILE, WEIGHTS_FILE)
_CHUNK_BYTES = 1 << 20


class ArtifactDigest:
    """Incremental digest: call `begin_file` with each file's name and size in sorted name order, then
    `update` with its bytes; `hexdigest` checks that every file was fed whole."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._last_name: str | None = None
        self._remaining_bytes = 0

    def begin_file(self, name: str, size_bytes: int) -> None:
        if self._remaining_bytes:
            raise ValueError(f"file {self._last_name!r} is missing {self._remaining_bytes} bytes")
        if self._last_name is not None and name <= self._last_name:
            raise ValueError("files must be digested in ascending name order")
        self._last_name = name
        self._remaining_bytes = size_bytes
        self._hash.update(name.encode() + b"\x00" + size_bytes.to_bytes(8, "big"))

    def update(self, data: bytes) -> None:
        if len(data) > self._remaining_bytes:
            raise ValueError(f"file {self._last_name!r} is longer than declared")
        self._remaining_bytes -= len(data)
        self._hash.update(data)

    def hexdigest(self) -> str:
        if self._remaining_bytes:
            raise ValueError(f"file {self._last_name!r} is missing {self._remaining_bytes} bytes")
        return self._hash.hexdigest()


def digest_bytes(files: dict[str, bytes]) -> str:
    """Digest of in-memory files {name: content}."""
    digest = ArtifactDigest()
    for name in sorted(files):
        digest.begin_file(name, len(files[name]))
        digest.update(files[name])
    return digest.hexdigest()


def digest_dir(path: str | Path, names: Iterable[str] = ARTIFACT_FILES) -> str:
    """Digest of the named files of a directory, streamed from disk."""
    root = Path(path)
    digest = ArtifactDigest()
    for name in sorted(names):
        file_path = root / name
        digest.begin_file(name, file_path.stat().st_size)
        with open(file_path, "rb") as f:
            while chunk := f.read(_CHUNK_BYTES):
                digest.update(chunk)
    return digest.hexdigest()


OWNER_FILE = ".owner"


class SharedArtifactsDir(ValueError):
    """An artifacts directory already holds the other component's artifacts."""


def files_fingerprint(path: Path, names: Iterable[str] = ARTIFACT_FILES) -> tuple | None:
    """(name, size, modification time, inode) of each of an adapter directory's files, one `stat` each:
    files written, replaced or truncated since show another fingerprint. None when one cannot be read."""
    try:
        return tuple(
            (name, st.st_size, st.st_mtime_ns, st.st_ino) for name in names for st in (os.stat(path / name),)
        )
    except OSError:
        return None


def claim_artifacts_dir(root: Path, owner: str, mark: bool = True) -> None:
    """Marks `root` as `owner`'s ("control-plane" or "worker"), refusing one the other holds: both keep
    artifacts in `STATE_DIR/artifacts` under sha256-named folders, and a worker sharing the control plane's
    state dir would take its stored copies for its cache (and remove them to stay in its disk budget).
    `mark=False` only checks (writes nothing: a start refused later leaves no trace)."""
    marker = root / OWNER_FILE
    try:
        held = marker.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        held = ""
    if held and held != owner:
        raise SharedArtifactsDir(
            f"{root} holds the {held}'s artifacts: give the {owner} a state directory of its own (--state-dir, "
            "OPENLORA_STATE_DIR)"
        )
    if mark and not held:
        root.mkdir(parents=True, exist_ok=True)
        marker.write_text(owner + "\n", encoding="utf-8")
