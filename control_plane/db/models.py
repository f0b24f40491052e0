"""Imports every table so `Base.metadata` is complete (for Alembic comparisons and tests)."""

from control_plane.billing.models import InvoiceLineRow, InvoiceRow, Price
from control_plane.db.base import Base
from control_plane.mixes.models import Mix, MixMember
from control_plane.registry.models import Adapter
from control_plane.tenancy.models import ApiKey, Tenant
from control_plane.usage.models import UsageCounter, UsageEvent, UsageEventAdapter
from control_plane.usage.reservation import RequestIdReservation
from control_plane.workers.models import BaseModelRow, Worker

__all__ = [
    "Adapter",
    "ApiKey",
    "Base",
    "BaseModelRow",
    "InvoiceLineRow",
    "InvoiceRow",
    "Mix",
    "MixMember",
    "Price",
    "RequestIdReservation",
    "Tenant",
    "UsageCounter",
    "UsageEvent",
    "UsageEventAdapter",
    "Worker",
]
