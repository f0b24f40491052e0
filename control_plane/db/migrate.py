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


class SchemaAheadError(RuntimeError):
    """The database schema is at a revision this code does not know: a newer version migrated it."""


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation: a literal % in a password must be doubled.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Applies the migrations up to `revision`. Raises SchemaAheadError when the database is at a revision
    this code does not know (Alembic's own error is a traceback about a missing script)."""
    check_schema_known(database_url)
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    check_schema_known(database_url)
    command.downgrade(alembic_config(database_url), revision)


def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config("postgresql://unused/"))


def head_revision() -> str | None:
    return _scripts().get_current_head()


def current_revision(database_url: str) -> str | None:
    engine = create_engine(sqlalchemy_url(database_url), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def check_schema_known(database_url: str) -> str | None:
    """The database's revision (None when empty). Raises SchemaAheadError when none of `migrations/` names
    it: a newer version migrated it, and neither running this one nor migrating with it can help."""
    current = current_revision(database_url)
    if current is not None and current not in {script.revision for script in _scripts().walk_revisions()}:
        raise SchemaAheadError(
            f"database schema is at revision {current}, which this version does not know (its newest is "
            f"{head_revision()}): a newer version migrated it; run that version, or downgrade the schema "
            f"to {head_revision()} with its migrations first"
        )
    return current


def ensure_schema_current(database_url: str) -> None:
    """Raises SchemaBehindError with the command to run when the database is behind the head revision,
    SchemaAheadError when it is at a revision this code does not know."""
    current, head = check_schema_known(database_url), head_revision()
    if current != head:
        raise SchemaBehindError(
            f"database schema is at revision {current or '<empty>'} but this version needs {head}; "
            "run `openlora control-plane --migrate-only` (or start without --no-migrate)"
        )
