"""Engines and sessions. Service functions take a `sessionmaker` and open one transaction each."""

from __future__ import annotations

from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker


def sqlalchemy_url(database_url: str) -> str:
    """`postgresql://...` (libpq style) -> the psycopg 3 dialect URL SQLAlchemy needs."""
    url = make_url(database_url)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    return url.render_as_string(hide_password=False)


def make_engine(database_url: str, pool_size: int = 10, pool_timeout_s: float = 30.0) -> Engine:
    """A pooled engine: `pool_size` connections kept, as many more opened under load; a session that finds
    all of them in use waits up to `pool_timeout_s`, then raises sqlalchemy.exc.TimeoutError (which the
    server answers UNAVAILABLE: retry)."""
    return create_engine(
        sqlalchemy_url(database_url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_timeout=pool_timeout_s,
        pool_pre_ping=True,
    )


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
