"""Applies the Alembic migrations in `migrations/` programmatically (no alembic.ini needed)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, pool

from control_plane.db.engine import sqlalchemy_url

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


class SchemaBehindError(RuntimeError):
    """The database schema is older than this code and migrations were not to be applied."""


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation: a literal % in a password must be doubled.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(database_url), revision)


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("postgresql://unused/")).get_current_head()


def current_revision(database_url: str) -> str | None:
    engine = create_engine(sqlalchemy_url(database_url), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def ensure_schema_current(database_url: str) -> None:
    """Raises SchemaBehindError with the command to run when the database is not at the head revision."""
    current, head = current_revision(database_url), head_revision()
    if current != head:
        raise SchemaBehindError(
            f"database schema is at revision {current or '<empty>'} but this version needs {head}; "
            "run `openlora control-plane --migrate-only` (or start without --no-migrate)"
        )
