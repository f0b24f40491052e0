"""Migrations are reversible and match the models."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, pool

from control_plane.db.engine import sqlalchemy_url
from control_plane.db.migrate import (
    SchemaAheadError,
    SchemaBehindError,
    current_revision,
    downgrade,
    ensure_schema_current,
    head_revision,
    upgrade,
)
from control_plane.db.models import Base

ROOT = Path(__file__).resolve().parents[2]


def _tables(url: str) -> set[str]:
    engine = create_engine(sqlalchemy_url(url), poolclass=pool.NullPool)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def _schema_diff(url: str) -> list:
    engine = create_engine(sqlalchemy_url(url), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            return compare_metadata(MigrationContext.configure(connection), Base.metadata)
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade_round_trip(empty_database_url: str) -> None:
    upgrade(empty_database_url)
    assert current_revision(empty_database_url) == head_revision()
    assert _tables(empty_database_url) == set(Base.metadata.tables)
    assert _schema_diff(empty_database_url) == []

    downgrade(empty_database_url, "base")
    assert current_revision(empty_database_url) is None
    assert _tables(empty_database_url) == set()

    upgrade(empty_database_url)
    assert _schema_diff(empty_database_url) == []


def test_schema_behind_is_refused_with_a_clear_message(empty_database_url: str) -> None:
    with pytest.raises(SchemaBehindError, match="--migrate-only"):
        ensure_schema_current(empty_database_url)
    upgrade(empty_database_url)
    ensure_schema_current(empty_database_url)


def _execute(url: str, sql: str) -> None:
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(sql)


def _scalar(url: str, sql: str):
    with psycopg.connect(url) as connection:
        return connection.execute(sql).fetchone()[0]


def test_schema_ahead_of_this_code_is_refused_with_a_clear_message(empty_database_url: str) -> None:
    url = empty_database_url
    upgrade(url)
    _execute(url, "UPDATE alembic_version SET version_num = '0099'")
    for call in (upgrade, ensure_schema_current, downgrade):
        with pytest.raises(SchemaAheadError, match="at revision 0099, which this version does not know"):
            call(url)
    assert current_revision(url) == "0099"
    assert _schema_diff(url) == []


def _waiting_on_locks(url: str) -> int:
    return _scalar(
        url,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )


def _migrate_only(url: str, state_dir: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENLORA_")}
    return subprocess.Popen(
        [sys.executable, "-m", "openlora.cli", "control-plane", "--database-url", url, "--migrate-only",
         "--state-dir", str(state_dir)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip


def test_control_planes_migrating_at_once_apply_each_step_once(
    empty_database_url: str, tmp_path: Path
) -> None:
    """Two control planes that start while a step is held up (a rolling upgrade starts replicas together):
    the second waits for the first and then finds nothing to apply; before, both applied the step and one
    failed on the column the other had added."""
    url = empty_database_url
    upgrade(url, "0009")
    with psycopg.connect(url) as holder:
        holder.execute("LOCK TABLE worker IN ACCESS EXCLUSIVE MODE")  # 0010 alters worker: both runs stop
        runs = [_migrate_only(url, tmp_path / f"cp{i}") for i in range(2)]
        while _waiting_on_locks(url) < 2:
            time.sleep(0.05)
        holder.rollback()
    outcomes = [(run.wait(120), run.stderr.read()) for run in runs]
    assert [code for code, _ in outcomes] == [0, 0], outcomes
    assert current_revision(url) == head_revision()
    assert _schema_diff(url) == []
