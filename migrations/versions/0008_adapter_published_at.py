"""Adapters remember when they were first public (`published_at`, never cleared): a public name belongs to
the tenant that published it first, so another tenant can no longer take over the name (and its callers,
at its own royalty) once the first publisher deletes its adapter or makes it private.

Existing adapters keep what callers reach today: of each name's public adapters, the one the old rule
served (the oldest READY one) is published when it was created; deleted ones and later ones of the same
name claim nothing.

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
    op.execute(
        "UPDATE adapter SET published_at = created_at WHERE id IN ("
        " SELECT DISTINCT ON (name) id FROM adapter WHERE visibility = 'public' AND status = 'ready'"
        " ORDER BY name, created_at, id)"
    )
    op.create_index("ix_adapter_name_published_at", "adapter", ["name", "published_at"])


def downgrade() -> None:
    op.drop_index("ix_adapter_name_published_at", table_name="adapter")
    op.drop_column("adapter", "published_at")
