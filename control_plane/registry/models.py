"""Table: `adapter`. A name is unique per owning tenant; deleting marks the row DELETED (usage keeps
pointing at it), and re-uploading a name replaces its artifact in place (same id, new sha256)."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import ARRAY, BigInteger, DateTime, ForeignKey, Index, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from control_plane.db.base import Base, utc_now
from openlora.cache_scope import cache_scope

VISIBILITY_PRIVATE = "private"
VISIBILITY_PUBLIC = "public"
STATUS_READY = "ready"
STATUS_DELETED = "deleted"


class Adapter(Base):
    __tablename__ = "adapter"
    # The name index finds a public name's first publisher (`registry.public_claimant`).
    __table_args__ = (
        UniqueConstraint("tenant_id", "name"),
        Index("ix_adapter_name_published_at", "name", "published_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenant.id"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    visibility: Mapped[str] = mapped_column(String(16), default=VISIBILITY_PRIVATE)
    base_model_name: Mapped[str] = mapped_column(ForeignKey("base_model.name"))
    base_model_fingerprint: Mapped[str] = mapped_column(String(64))
    rank: Mapped[int]
    alpha: Mapped[float]
    use_rslora: Mapped[bool] = mapped_column(default=False)
    target_modules: Mapped[list[str]] = mapped_column(ARRAY(String(32)))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), default=STATUS_READY)
    royalty_micros_per_million_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    keep_warm: Mapped[bool] = mapped_column(default=False)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    # When the row first became public, never cleared: the name's claim among public adapters. Other
    # tenants' calls of a name reach only the adapter of the tenant that published it first.
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)

    @property
    def cache_scope(self) -> str:
        """Who may share workers' cached copies of its content: '' when public, else its owner's scope."""
        return cache_scope(self.tenant_id, self.visibility != VISIBILITY_PUBLIC)
