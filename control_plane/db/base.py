"""The one declarative base every table hangs on, with a naming convention for constraints."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import MetaData, func, select
from sqlalchemy.orm import DeclarativeBase, Session

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def utc_now() -> datetime:
    return datetime.now(UTC)


def lock_until_commit(session: Session, key: str) -> None:
    """Serializes, until the transaction ends, every transaction that takes the same `key` (a PostgreSQL
    advisory lock on its hash): for check-then-insert work whose row may not exist yet, which a row lock
    cannot hold."""
    session.execute(select(func.pg_advisory_xact_lock(func.hashtextextended(key, 0))))
