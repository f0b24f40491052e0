"""Adapters remember when they were first public (`published_at`, never cleared): a public name belongs to
the tenant that published it first, so another tenant can no longer take over the name (and its callers,
at its own royalty) once the first publisher deletes its adapter or makes it private.

Existing public adapters count as published when they were created.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("adapter", sa.Column("published_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE adapter SET published_at = created_at WHERE visibility = 'public'")
    op.create_index("ix_adapter_name_published_at", "adapter", ["name", "published_at"])


def downgrade() -> None:
    op.drop_index("ix_adapter_name_published_at", table_name="adapter")
    op.drop_column("adapter", "published_at")
