"""Tables: `base_model` (dimensions a worker registered) and `worker`."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ColumnElement, DateTime, ForeignKey, String, and_
from sqlalchemy.ext.hybrid import hybrid_method
from sqlalchemy.orm import Mapped, mapped_column

from control_plane.db.base import Base, utc_now
from openlora.base_model import BaseModelSpec


class BaseModelRow(Base):
    __tablename__ = "base_model"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    architecture: Mapped[str] = mapped_column(String(64))
    hidden_size: Mapped[int]
    intermediate_size: Mapped[int]
    num_layers: Mapped[int]
    num_attention_heads: Mapped[int]
    num_key_value_heads: Mapped[int]
    head_dim: Mapped[int]
    vocab_size: Mapped[int]
    registered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)

    def to_spec(self) -> BaseModelSpec:
        return BaseModelSpec(
            name=self.name,
            architecture=self.architecture,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            vocab_size=self.vocab_size,
        )


class Worker(Base):
    __tablename__ = "worker"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    address: Mapped[str] = mapped_column(String(256))
    base_model_name: Mapped[str] = mapped_column(ForeignKey("base_model.name"))
    max_lora_rank: Mapped[int]
    num_adapter_slots: Mapped[int]
    registered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    last_heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    running_requests: Mapped[int] = mapped_column(default=0)
    waiting_requests: Mapped[int] = mapped_column(default=0)
    resident_adapters: Mapped[int] = mapped_column(default=0)
    # The process run that registered it last (empty: a worker that does not say); see `register_worker`.
    instance_id: Mapped[str] = mapped_column(String(64), default="", server_default="")
    # When that instance said it left (a clean stop); None while it serves, or after it died unannounced.
    left_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)

    @hybrid_method
    def is_live_within(self, since: datetime, until: datetime) -> bool:
        """The one rule by which a worker counts as serving (its rank limit, its base model's dimensions,
        its id held): a heartbeat in [`since`, `until`], and it has not said it left. Worker rows outlive
        their workers; a crashed one stops counting when its heartbeats stop, a cleanly stopped one at once.
        A heartbeat past `until` was stamped before the control plane's clock stepped back and says
        nothing of how long ago it came: counted, a worker that died then was live for as long as the step."""
        return self.left_at is None and since <= self.last_heartbeat_at <= until

    @is_live_within.expression
    @classmethod
    def _is_live_within(cls, since: datetime, until: datetime) -> ColumnElement[bool]:
        return and_(cls.left_at.is_(None), cls.last_heartbeat_at.between(since, until))
