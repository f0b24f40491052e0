"""Tables: `price`, `invoice`, `invoice_line`. Money is integer micro-units of the currency."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import BigInteger, DateTime, ForeignKey, Identity, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from control_plane.db.base import Base, utc_now


class Price(Base):
    __tablename__ = "price"

    base_model: Mapped[str] = mapped_column(String(128), primary_key=True)
    prompt_micros_per_million_tokens: Mapped[int] = mapped_column(BigInteger)
    completion_micros_per_million_tokens: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class InvoiceRow(Base):
    """The last computed invoice of a tenant and month; recomputed (and replaced) on every request."""

    __tablename__ = "invoice"
    __table_args__ = (UniqueConstraint("tenant_id", "period"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenant.id"))
    period: Mapped[str] = mapped_column(String(7))
    charges_micros: Mapped[int] = mapped_column(BigInteger)
    earnings_micros: Mapped[int] = mapped_column(BigInteger)
    net_micros: Mapped[int] = mapped_column(BigInteger)
    computed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class InvoiceLineRow(Base):
    __tablename__ = "invoice_line"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    invoice_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("invoice.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    base_model: Mapped[str] = mapped_column(String(128))
    adapter: Mapped[str] = mapped_column(String(128))
    prompt_tokens: Mapped[int] = mapped_column(BigInteger)
    completion_tokens: Mapped[int] = mapped_column(BigInteger)
    amount_micros: Mapped[int] = mapped_column(BigInteger)
    request_kind: Mapped[str] = mapped_column(String(64), default="", server_default="")
    mix: Mapped[str] = mapped_column(Text, default="", server_default="")
    adapter_owner: Mapped[str] = mapped_column(String(64), default="", server_default="")
