"""Workers record when they said they left (a clean stop): such a worker no longer counts as live at once,
instead of three heartbeat intervals later (its rank limit bounded uploads and mixes, its base model's
dimensions held the name, its id was refused to another process). Registering again clears it.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("worker", sa.Column("left_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("worker", "left_at")
