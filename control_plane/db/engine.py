"""Engines and sessions. Service functions take a `sessionmaker` and open one transaction each."""

from __future__ import annotations

import re

from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker


class DatabaseUnusable(Exception):
    """The database URL cannot be used: `exit_code` 2 when starting again cannot help (a URL that is not
    PostgreSQL's, a database that does not exist, credentials refused), 1 when it may (not reachable)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# What PostgreSQL (through psycopg) says when retrying cannot help: no such database or role, credentials
# refused. Anything else (refused connection, too many connections, the server starting or shutting down)
# may pass: exit 1, and `up` starts the control plane again.
_PERMANENT = re.compile(
    r'(?:database|role) "[^"]*" does not exist|password authentication failed|no password supplied'
)


def check_database_url(database_url: str) -> None:
    """DatabaseUnusable (exit 2) for a URL that is not a PostgreSQL one SQLAlchemy can parse."""
    try:
        url = make_url(database_url)
    except Exception as error:  # sqlalchemy.exc.ArgumentError: not a URL at all
        raise DatabaseUnusable(f"the database URL is malformed: {error}", 2) from None
    if url.get_backend_name() not in ("postgresql", "postgres"):
        raise DatabaseUnusable(
            f"the database URL must be a PostgreSQL one (postgresql://user@host:port/db), got "
            f"{url.render_as_string(hide_password=True)!r}",
            2,
        )


def database_unusable(error: BaseException, database_url: str) -> DatabaseUnusable | None:
    """The one-line account of an error met connecting to `database_url` (password hidden), or None when
    `error` is not about reaching the database."""
    from sqlalchemy.exc import OperationalError

    if not isinstance(error, OperationalError):
        return None
    where = make_url(database_url).render_as_string(hide_password=True)
    reason = str(error.orig or error).strip().splitlines()
    detail = " ".join(line.strip() for line in reason) if reason else type(error).__name__
    permanent = _PERMANENT.search(detail) is not None
    return DatabaseUnusable(f"cannot use the database at {where}: {detail}", 2 if permanent else 1)


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
