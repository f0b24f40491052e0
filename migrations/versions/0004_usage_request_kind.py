"""Usage by request kind: each event, hourly counter and invoice line carries its request kind and mix
identity, so that an invoice shows a mix or ensemble as one line per kind and mix.

Existing rows get kind "" (a record that did not say: billed per adapter, as before). The downgrade folds
the counters of one (tenant, base model, adapter, hour) back into one row, their sums unchanged.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_OLD_KEY = ["tenant_id", "base_model", "adapter_id", "hour_at"]


def upgrade() -> None:
    for table in ("usage_event", "usage_counter", "invoice_line"):
        op.add_column(table, sa.Column("request_kind", sa.String(64), server_default="", nullable=False))
        op.add_column(table, sa.Column("mix", sa.Text(), server_default="", nullable=False))
    op.drop_constraint("uq_usage_counter_tenant_id_base_model_adapter_id_hour_at", "usage_counter")
    op.create_unique_constraint(
        "uq_usage_counter_line_hour",
        "usage_counter",
        [*_OLD_KEY, "request_kind", "mix"],
        postgresql_nulls_not_distinct=True,
    )


def downgrade() -> None:
    # One row per old key: the lowest id keeps the sums of its key, the others go.
    op.execute(
        """
        UPDATE usage_counter AS keep
        SET requests = sums.requests,
            prompt_micro_tokens = sums.prompt_micro_tokens,
            completion_micro_tokens = sums.completion_micro_tokens
        FROM (
            SELECT min(id) AS id, sum(requests) AS requests,
                   sum(prompt_micro_tokens) AS prompt_micro_tokens,
                   sum(completion_micro_tokens) AS completion_micro_tokens
            FROM usage_counter
            GROUP BY tenant_id, base_model, adapter_id, hour_at
        ) AS sums
        WHERE keep.id = sums.id
        """
    )
    op.execute(
        """
        DELETE FROM usage_counter
        WHERE id NOT IN (
            SELECT min(id) FROM usage_counter GROUP BY tenant_id, base_model, adapter_id, hour_at
        )
        """
    )
    op.drop_constraint("uq_usage_counter_line_hour", "usage_counter")
    op.create_unique_constraint(
        "uq_usage_counter_tenant_id_base_model_adapter_id_hour_at",
        "usage_counter",
        _OLD_KEY,
        postgresql_nulls_not_distinct=True,
    )
    for table in ("invoice_line", "usage_counter", "usage_event"):
        op.drop_column(table, "mix")
        op.drop_column(table, "request_kind")
