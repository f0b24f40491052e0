"""Workers remember the instance (process run) that registered them last, so that a worker id a live
worker holds is refused to another process: two processes under one id shared its request id
reservations (each could serve an id the other was serving) and its usage (one serving went unbilled).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("worker", sa.Column("instance_id", sa.String(64), nullable=False, server_default=""))


def downgrade() -> None:
    op.drop_column("worker", "instance_id")
