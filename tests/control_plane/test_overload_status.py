"""Overload of the control plane (its database connection pool exhausted, its process out of open files)
reaches callers as UNAVAILABLE with a message to retry, never INTERNAL; a fault of its own stays INTERNAL."""

from __future__ import annotations

import errno

import grpc
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from control_plane.db.engine import make_engine, make_sessionmaker
from control_plane.server.interceptor import status_of


def test_an_exhausted_connection_pool_is_unavailable_not_internal(database_url):
    engine = make_engine(database_url, pool_size=1, pool_timeout_s=0.2)
    sessions = make_sessionmaker(engine)
    try:
        # The pool's one connection and its one overflow connection are in use: a third session waits out
        # the pool timeout.
        held = [engine.connect(), engine.connect()]
        with pytest.raises(sa_exc.TimeoutError) as exhausted, sessions() as session:
            session.execute(text("SELECT 1"))
        for connection in held:
            connection.close()
        with sessions() as session:  # connections given back: served again
            assert session.execute(text("SELECT 1")).scalar() == 1
    finally:
        engine.dispose()
    code, message = status_of(exhausted.value)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "retry" in message


@pytest.mark.parametrize(
    ("error", "resource"),
    [
        (OSError(errno.EMFILE, "Too many open files"), "open files"),
        (OSError(errno.ENOSPC, "No space left on device"), "disk space"),
        (MemoryError(), "memory"),
        (RuntimeError("can't start new thread"), "threads"),
    ],
)
def test_a_process_out_of_a_resource_is_unavailable_not_internal(error, resource):
    code, message = status_of(error)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert resource in message and "retry" in message


@pytest.mark.parametrize("error", [ValueError("a bug"), OSError(errno.EIO, "Input/output error")])
def test_a_fault_of_the_control_plane_itself_stays_internal(error):
    assert status_of(error) == (grpc.StatusCode.INTERNAL, "internal error")
