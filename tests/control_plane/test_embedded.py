"""Embedded PostgreSQL and Redis start, keep their data across a restart, and leave no processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import psycopg
import pytest
import redis

from openlora.embedded import EmbeddedPostgres, EmbeddedRedis


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
