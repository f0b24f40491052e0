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


def libpq_url(database_url: str) -> str:
    """The same database as a plain `postgresql://` URL, for psycopg (or libpq) used directly."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


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
        connect_args=CONNECT_ARGS,
    )


# libpq settings of every connection: a database that does not answer a connection attempt fails it within
# 5 s (UNAVAILABLE to the caller) instead of the OS's minutes, and TCP keepalives find a peer gone silent
# (a partition, a dead host) within about 25 s of idle. A process that is paused but whose host still
# acknowledges the connection is not caught by either: a call on it waits for its caller's deadline.
CONNECT_ARGS = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
