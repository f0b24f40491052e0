"""Request-id reservations: one worker at a time serves a tenant's client-chosen request id.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "request_id_reservation",
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("worker_id", sa.String(128), nullable=False),
        sa.Column("reserved_at", TZ, nullable=False),
        sa.Column("expires_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "request_id", name="pk_request_id_reservation"),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenant.id"], name="fk_request_id_reservation_tenant_id_tenant"
        ),
    )
    op.create_index("ix_request_id_reservation_expires_at", "request_id_reservation", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_request_id_reservation_expires_at", table_name="request_id_reservation")
    op.drop_table("request_id_reservation")
