"""A control plane given a database it cannot use says so in one line (password hidden) and exits 2 when
starting again cannot help (not PostgreSQL, no such database) or 1 when it may (nothing answers), which
`openlora up` reads as "stop" or "restart": it printed a traceback per restart for five minutes."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[2]


def _control_plane(tmp_path: Path, database_url: str, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENLORA_")}
    return subprocess.run(
        [sys.executable, "-m", "openlora.cli", "control-plane", "--database-url", database_url,
         "--state-dir", str(tmp_path / "cp"), *extra],
        env=env, capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip


def _missing_database(postgres_server_url: str) -> str:
    url = make_url(postgres_server_url).set(database=f"nope_{uuid.uuid4().hex[:8]}", password="s3cret")
    return url.render_as_string(hide_password=False)


@pytest.mark.parametrize("serve", [False, True])
def test_a_database_that_does_not_exist_is_one_line_and_exit_2(postgres_server_url, tmp_path, serve):
    url = _missing_database(postgres_server_url)
    extra = (
        ["--listen", "127.0.0.1:0", "--redis-url", "redis://127.0.0.1:1/0", "--worker-token", "w" * 20]
        if serve
        else ["--migrate-only"]
    )
    result = _control_plane(tmp_path, url, *extra)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "cannot use the database at" in line and "does not exist" in line
    assert "s3cret" not in result.stderr and "***" in line


def test_a_database_nothing_answers_for_is_exit_1_so_a_supervisor_tries_again(tmp_path):
    result = _control_plane(tmp_path, "postgresql://postgres@127.0.0.1:1/test", "--migrate-only")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "cannot use the database at postgresql://postgres@127.0.0.1:1/test" in result.stderr


@pytest.mark.parametrize("url", ["mysql://x", "sqlite:///tmp/db", "::not a url::"])
def test_a_url_that_is_not_postgresql_is_refused_before_connecting(tmp_path, url):
    result = _control_plane(tmp_path, url, "--migrate-only")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "error: the database URL" in result.stderr


@pytest.mark.parametrize(
    ("message", "exit_code"),
    [
        ('connection failed: FATAL:  database "x" does not exist', 2),
        ('connection failed: FATAL:  role "app" does not exist', 2),
        ('connection failed: FATAL:  password authentication failed for user "app"', 2),
        ("connection failed: fe_sendauth: no password supplied", 2),
        # Passing states: `up` must start the control plane again, not stop for good.
        ('connection failed: FATAL:  too many connections for role "app"', 1),
        (
            "connection failed: FATAL:  remaining connection slots are reserved for roles with privileges of "
            'the "pg_use_reserved_connections" role\nMultiple connection attempts failed. All failures were:\n'
            "- host: 'localhost', port: '5432', hostaddr: '::1': connection refused",
            1,
        ),
        ("connection failed: FATAL:  the database system is starting up", 1),
        ("connection failed: Connection refused\n\tIs the server running on that host?", 1),
    ],
)
def test_only_errors_a_restart_cannot_cure_exit_2(message, exit_code):
    from sqlalchemy.exc import OperationalError

    from control_plane.db.engine import database_unusable

    unusable = database_unusable(OperationalError("SELECT 1", {}, Exception(message)), "postgresql://a@h/db")
    assert unusable is not None and unusable.exit_code == exit_code
