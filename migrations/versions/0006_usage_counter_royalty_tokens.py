"""Royalty tokens apart from the token split: each hourly counter line also counts the completion
micro-tokens its adapter earns a royalty on. An adapter of a linear mix or a merge earns on every token of
the request (its weight, which the caller picks, does not dilute it); otherwise the line's own completion
share.

Existing rows keep the royalty basis they were billed on: their completion micro-tokens. The downgrade is
refused while a line earns on more (or fewer) than them: revision 0005 bills royalties on completion
micro-tokens, so dropping the column would change what adapter owners earned, without a word.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "usage_counter",
        sa.Column("royalty_micro_tokens", sa.BigInteger(), server_default="0", nullable=False),
    )
    op.execute(
        "UPDATE usage_counter SET royalty_micro_tokens = completion_micro_tokens WHERE adapter_id IS NOT NULL"
    )


def downgrade() -> None:
    differing = (
        op.get_bind()
        .execute(
            sa.text(
                "SELECT count(*) FROM usage_counter"
                " WHERE adapter_id IS NOT NULL AND royalty_micro_tokens <> completion_micro_tokens"
            )
        )
        .scalar_one()
    )
    if differing:
        raise RuntimeError(
            f"refusing to downgrade below revision 0006: {differing} hourly usage line(s) earn royalties on "
            "other tokens than their completion share (adapters of linear mixes and merges earn on every "
            "token); revision 0005 cannot hold that, and those adapters' owners would earn less. "
            "Stay at 0006 or later"
        )
    op.drop_column("usage_counter", "royalty_micro_tokens")
