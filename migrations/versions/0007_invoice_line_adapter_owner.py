"""Invoice lines name the owner of their adapter: lines are per adapter (its id), not per name, so two
tenants' adapters of one name are two lines and each says whose it is.

Existing lines keep an empty owner until their invoice is computed again.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "invoice_line", sa.Column("adapter_owner", sa.String(64), server_default="", nullable=False)
    )


def downgrade() -> None:
    op.drop_column("invoice_line", "adapter_owner")
