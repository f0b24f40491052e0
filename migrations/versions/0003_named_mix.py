"""Named mixes: a tenant's saved mixes of adapters (`mix`) and their members (`mix_member`).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "mix",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("method", sa.String(32), nullable=False),
        sa.Column("density", sa.Float(), nullable=True),
        sa.Column("majority_sign_method", sa.String(16), nullable=False),
        sa.Column("combine", sa.String(16), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_mix"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenant.id"], name="fk_mix_tenant_id_tenant"),
        sa.UniqueConstraint("tenant_id", "name", name="uq_mix_tenant_id_name"),
    )
    op.create_index("ix_mix_tenant_id", "mix", ["tenant_id"])
    op.create_table(
        "mix_member",
        sa.Column("mix_id", sa.Uuid(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("adapter_id", sa.Uuid(), nullable=True),
        sa.Column("weight", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("mix_id", "position", name="pk_mix_member"),
        sa.ForeignKeyConstraint(["mix_id"], ["mix.id"], name="fk_mix_member_mix_id_mix", ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["adapter_id"], ["adapter.id"], name="fk_mix_member_adapter_id_adapter"),
    )
    op.create_index("ix_mix_member_adapter_id", "mix_member", ["adapter_id"])


def downgrade() -> None:
    op.drop_index("ix_mix_member_adapter_id", table_name="mix_member")
    op.drop_table("mix_member")
    op.drop_index("ix_mix_tenant_id", table_name="mix")
    op.drop_table("mix")
