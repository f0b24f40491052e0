"""Tables: `usage_event`, `usage_event_adapter` (one row per adapter of a request, with its mix weight)
and `usage_counter` (per tenant, base model, adapter, hour, request kind and mix; moved only by really
inserted events).

Counters hold weighted tokens as integer micro-tokens (tokens * 1e6 * share), so the tokens of a mixed
request split exactly across its adapters."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    DateTime,
    ForeignKey,
    ForeignKeyConstraint,
    Identity,
    Index,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import Mapped, mapped_column

from control_plane.db.base import Base

MICROS = 1_000_000


class UsageEvent(Base):
    """One request, unique by (tenant, request id): request ids are chosen by clients, so another tenant
    reusing one never suppresses (or adds to) this tenant's billing."""

    __tablename__ = "usage_event"
    __table_args__ = (
        Index("ix_usage_event_tenant_id_finished_at", "tenant_id", "finished_at"),
        Index("ix_usage_event_recorded_at", "recorded_at"),  # the predictor reads what is new since a pass
    )

    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenant.id"), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    worker_id: Mapped[str] = mapped_column(String(128), default="")
    base_model: Mapped[str] = mapped_column(String(128), default="")
    prompt_tokens: Mapped[int] = mapped_column(BigInteger)
    completion_tokens: Mapped[int] = mapped_column(BigInteger)
    queue_ms: Mapped[float] = mapped_column(default=0.0)
    ttft_ms: Mapped[float] = mapped_column(default=0.0)
    total_ms: Mapped[float] = mapped_column(default=0.0)
    finish_reason: Mapped[str] = mapped_column(String(32), default="")
    # "single" | "linear_mix" | "merge:<method>" | "ensemble"; "" from a worker that did not say.
    request_kind: Mapped[str] = mapped_column(String(64), default="", server_default="")
    # A mix's or ensemble's identity on the invoice: the saved mix's name, else its adapters' names
    # sorted and joined by "+"; "" for other kinds.
    mix: Mapped[str] = mapped_column(Text, default="", server_default="")
    finished_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # When its transaction began, by the database's clock (the predictor reads what is new since a pass).
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=func.now())


class UsageEventAdapter(Base):
    __tablename__ = "usage_event_adapter"
    __table_args__ = (
        ForeignKeyConstraint(
            ["tenant_id", "request_id"],
            ["usage_event.tenant_id", "usage_event.request_id"],
            name="fk_usage_event_adapter_tenant_id_usage_event",
            ondelete="CASCADE",
        ),
    )

    tenant_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    request_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    adapter_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("adapter.id"), primary_key=True)
    weight: Mapped[Decimal] = mapped_column(Numeric(18, 6))


class UsageCounter(Base):
    __tablename__ = "usage_counter"
    __table_args__ = (
        UniqueConstraint(
            "tenant_id",
            "base_model",
            "adapter_id",
            "hour_at",
            "request_kind",
            "mix",
            name="uq_usage_counter_line_hour",
            postgresql_nulls_not_distinct=True,
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenant.id"))
    base_model: Mapped[str] = mapped_column(String(128))
    # NULL: the base model alone.
    adapter_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("adapter.id"), index=True)
    hour_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # As on the events counted here: the invoice shows a mix or ensemble as one line per kind and mix.
    request_kind: Mapped[str] = mapped_column(String(64), default="", server_default="")
    mix: Mapped[str] = mapped_column(Text, default="", server_default="")
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    prompt_micro_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_micro_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    # Completion micro-tokens the adapter earns a royalty on: a linear mix's or merge's every token (not
    # its weighted share: the caller picks the weights), else this line's completion share. 0 without one.
    royalty_micro_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
