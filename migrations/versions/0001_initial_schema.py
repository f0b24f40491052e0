"""Initial schema: tenants, keys, base models, workers, adapters, usage, prices, invoices.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "tenant",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("is_operator", sa.Boolean(), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_tenant"),
        sa.UniqueConstraint("name", name="uq_tenant_name"),
    )
    op.create_table(
        "api_key",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("prefix", sa.String(32), nullable=False),
        sa.Column("salt_hex", sa.String(64), nullable=False),
        sa.Column("secret_hash_hex", sa.String(64), nullable=False),
        sa.Column("scopes", postgresql.ARRAY(sa.String(16)), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("revoked_at", TZ, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_key"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenant.id"], name="fk_api_key_tenant_id_tenant"),
        sa.UniqueConstraint("prefix", name="uq_api_key_prefix"),
    )
    op.create_index("ix_api_key_tenant_id", "api_key", ["tenant_id"])
    op.create_table(
        "base_model",
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("architecture", sa.String(64), nullable=False),
        sa.Column("hidden_size", sa.Integer(), nullable=False),
        sa.Column("intermediate_size", sa.Integer(), nullable=False),
        sa.Column("num_layers", sa.Integer(), nullable=False),
        sa.Column("num_attention_heads", sa.Integer(), nullable=False),
        sa.Column("num_key_value_heads", sa.Integer(), nullable=False),
        sa.Column("head_dim", sa.Integer(), nullable=False),
        sa.Column("vocab_size", sa.Integer(), nullable=False),
        sa.Column("registered_at", TZ, nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_base_model"),
    )
    op.create_table(
        "worker",
        sa.Column("id", sa.String(128), nullable=False),
        sa.Column("address", sa.String(256), nullable=False),
        sa.Column("base_model_name", sa.String(128), nullable=False),
        sa.Column("max_lora_rank", sa.Integer(), nullable=False),
        sa.Column("num_adapter_slots", sa.Integer(), nullable=False),
        sa.Column("registered_at", TZ, nullable=False),
        sa.Column("last_heartbeat_at", TZ, nullable=False),
        sa.Column("running_requests", sa.Integer(), nullable=False),
        sa.Column("waiting_requests", sa.Integer(), nullable=False),
        sa.Column("resident_adapters", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_worker"),
        sa.ForeignKeyConstraint(
            ["base_model_name"], ["base_model.name"], name="fk_worker_base_model_name_base_model"
        ),
    )
    op.create_table(
        "adapter",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("visibility", sa.String(16), nullable=False),
        sa.Column("base_model_name", sa.String(128), nullable=False),
        sa.Column("base_model_fingerprint", sa.String(64), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("alpha", sa.Double(), nullable=False),
        sa.Column("use_rslora", sa.Boolean(), nullable=False),
        sa.Column("target_modules", postgresql.ARRAY(sa.String(32)), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("royalty_micros_per_million_tokens", sa.BigInteger(), nullable=False),
        sa.Column("keep_warm", sa.Boolean(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
        sa.Column("deleted_at", TZ, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_adapter"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenant.id"], name="fk_adapter_tenant_id_tenant"),
        sa.ForeignKeyConstraint(
            ["base_model_name"], ["base_model.name"], name="fk_adapter_base_model_name_base_model"
        ),
        sa.UniqueConstraint("tenant_id", "name", name="uq_adapter_tenant_id_name"),
    )
    op.create_index("ix_adapter_tenant_id", "adapter", ["tenant_id"])
    op.create_index("ix_adapter_sha256", "adapter", ["sha256"])
    op.create_table(
        "price",
        sa.Column("base_model", sa.String(128), nullable=False),
        sa.Column("prompt_micros_per_million_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_micros_per_million_tokens", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("base_model", name="pk_price"),
    )
    op.create_table(
        "usage_event",
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("worker_id", sa.String(128), nullable=False),
        sa.Column("base_model", sa.String(128), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.Column("queue_ms", sa.Double(), nullable=False),
        sa.Column("ttft_ms", sa.Double(), nullable=False),
        sa.Column("total_ms", sa.Double(), nullable=False),
        sa.Column("finish_reason", sa.String(32), nullable=False),
        sa.Column("finished_at", TZ, nullable=False),
        sa.Column("recorded_at", TZ, nullable=False),
        # Request ids are chosen by clients: unique per tenant, never across tenants.
        sa.PrimaryKeyConstraint("tenant_id", "request_id", name="pk_usage_event"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenant.id"], name="fk_usage_event_tenant_id_tenant"),
    )
    op.create_index("ix_usage_event_tenant_id_finished_at", "usage_event", ["tenant_id", "finished_at"])
    op.create_table(
        "usage_event_adapter",
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("adapter_id", sa.Uuid(), nullable=False),
        sa.Column("weight", sa.Numeric(18, 6), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "request_id", "adapter_id", name="pk_usage_event_adapter"),
        sa.ForeignKeyConstraint(
            ["tenant_id", "request_id"],
            ["usage_event.tenant_id", "usage_event.request_id"],
            name="fk_usage_event_adapter_tenant_id_usage_event",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["adapter_id"], ["adapter.id"], name="fk_usage_event_adapter_adapter_id_adapter"
        ),
    )
    op.create_table(
        "usage_counter",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("base_model", sa.String(128), nullable=False),
        sa.Column("adapter_id", sa.Uuid(), nullable=True),
        sa.Column("hour_at", TZ, nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("prompt_micro_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_micro_tokens", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_usage_counter"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenant.id"], name="fk_usage_counter_tenant_id_tenant"),
        sa.ForeignKeyConstraint(["adapter_id"], ["adapter.id"], name="fk_usage_counter_adapter_id_adapter"),
        sa.UniqueConstraint(
            "tenant_id",
            "base_model",
            "adapter_id",
            "hour_at",
            name="uq_usage_counter_tenant_id_base_model_adapter_id_hour_at",
            postgresql_nulls_not_distinct=True,
        ),
    )
    op.create_index("ix_usage_counter_adapter_id", "usage_counter", ["adapter_id"])
    op.create_table(
        "invoice",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("period", sa.String(7), nullable=False),
        sa.Column("charges_micros", sa.BigInteger(), nullable=False),
        sa.Column("earnings_micros", sa.BigInteger(), nullable=False),
        sa.Column("net_micros", sa.BigInteger(), nullable=False),
        sa.Column("computed_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_invoice"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenant.id"], name="fk_invoice_tenant_id_tenant"),
        sa.UniqueConstraint("tenant_id", "period", name="uq_invoice_tenant_id_period"),
    )
    op.create_table(
        "invoice_line",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("invoice_id", sa.Uuid(), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("base_model", sa.String(128), nullable=False),
        sa.Column("adapter", sa.String(128), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.Column("amount_micros", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_invoice_line"),
        sa.ForeignKeyConstraint(
            ["invoice_id"], ["invoice.id"], name="fk_invoice_line_invoice_id_invoice", ondelete="CASCADE"
        ),
    )
    op.create_index("ix_invoice_line_invoice_id", "invoice_line", ["invoice_id"])


def downgrade() -> None:
    op.drop_index("ix_invoice_line_invoice_id", table_name="invoice_line")
    op.drop_table("invoice_line")
    op.drop_table("invoice")
    op.drop_index("ix_usage_counter_adapter_id", table_name="usage_counter")
    op.drop_table("usage_counter")
    op.drop_table("usage_event_adapter")
    op.drop_index("ix_usage_event_tenant_id_finished_at", table_name="usage_event")
    op.drop_table("usage_event")
    op.drop_table("price")
    op.drop_index("ix_adapter_sha256", table_name="adapter")
    op.drop_index("ix_adapter_tenant_id", table_name="adapter")
    op.drop_table("adapter")
    op.drop_table("worker")
    op.drop_table("base_model")
    op.drop_index("ix_api_key_tenant_id", table_name="api_key")
    op.drop_table("api_key")
    op.drop_table("tenant")
