"""One Postgres advisory lock per artifact sha256. Publishing an artifact together with writing the row
that points to it, and removing an artifact no row points to, each run under it in one transaction, so a
cleanup never deletes a directory another upload's row is about to point to."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session


def lock_key(sha256: str) -> int:
    """A signed 64-bit key from the first 16 hex digits; a collision only serialises two artifacts."""
    return int.from_bytes(bytes.fromhex(sha256[:16]), "big", signed=True)


def lock_artifact(session: Session, sha256: str) -> None:
    """Holds the artifact's lock until the session's transaction ends (commit or rollback)."""
    session.execute(select(func.pg_advisory_xact_lock(lock_key(sha256))))
