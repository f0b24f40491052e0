"""Alembic environment. Configured programmatically by `control_plane.db.migrate` (no alembic.ini):
the database URL arrives as the `sqlalchemy.url` main option."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool, text

from control_plane.db.engine import sqlalchemy_url
from control_plane.db.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    context.configure(
        url=sqlalchemy_url(config.get_main_option("sqlalchemy.url")),
        target_metadata=target_metadata,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(sqlalchemy_url(config.get_main_option("sqlalchemy.url")), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            # One run at a time: control planes started together (a rolling upgrade) each applied the same
            # steps, and all but one failed on what the first had created. Held until this transaction
            # ends; a run that waited reads the revision only then and finds nothing left to apply.
            connection.execute(
                text("SELECT pg_advisory_xact_lock(hashtextextended('openlora:migrations', 0))")
            )
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
