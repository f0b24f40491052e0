"""Tables: `mix` and `mix_member`. A mix is unique by name per tenant; its members point at adapter rows
(NULL: the base model, as an ensemble member) and are resolved for the tenant whenever the mix is used,
so a replaced member serves its new version and a deleted or hidden one makes the mix NOT_FOUND."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import DateTime, ForeignKey, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from control_plane.db.base import Base, utc_now

# The stored names of the methods, combines and sign methods (the enum values of inference.proto).
METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "ensemble")
# Methods that keep a fraction `density` of each delta.
DENSITY_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
# Methods that elect a sign per parameter (majority_sign_method).
ELECTING_METHODS = ("ties", "dare_ties")
SIGN_METHODS = ("total", "frequency")
COMBINES = ("probs", "logprobs")


class Mix(Base):
    __tablename__ = "mix"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenant.id"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    method: Mapped[str] = mapped_column(String(32))
    # Fraction of each delta kept, in (0, 1]; None for the methods that keep everything.
    density: Mapped[float | None] = mapped_column(default=None)
    majority_sign_method: Mapped[str] = mapped_column(String(16), default="total")
    combine: Mapped[str] = mapped_column(String(16), default="probs")
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)

    members: Mapped[list[MixMember]] = relationship(
        order_by="MixMember.position", cascade="all, delete-orphan", lazy="selectin"
    )


class MixMember(Base):
    __tablename__ = "mix_member"

    mix_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("mix.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(primary_key=True)
    # None: the base model (an ensemble member).
    adapter_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("adapter.id"), index=True, default=None)
    weight: Mapped[float]
