"""An index on usage_event.recorded_at: the predictor's pass reads only the events recorded since its
watermark, which without it is a scan of the whole table on every pass.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_usage_event_recorded_at", "usage_event", ["recorded_at"])


def downgrade() -> None:
    op.drop_index("ix_usage_event_recorded_at", table_name="usage_event")
