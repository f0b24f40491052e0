"""Migrations are reversible and match the models."""

from __future__ import annotations

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


def test_schema_ahead_of_this_code_is_refused_with_a_clear_message(empty_database_url: str) -> None:
    url = empty_database_url
    upgrade(url)
    _execute(url, "UPDATE alembic_version SET version_num = '0099'")
    for call in (upgrade, ensure_schema_current, downgrade):
        with pytest.raises(SchemaAheadError, match="at revision 0099, which this version does not know"):
            call(url)
    assert current_revision(url) == "0099"
    assert _schema_diff(url) == []
