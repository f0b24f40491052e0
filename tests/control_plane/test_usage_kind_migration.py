"""Migration 0004 (request kinds on usage) keeps every counted token: existing rows become kind "" (billed
per adapter, as before), and the downgrade folds the counters of one adapter and hour back into one row."""

from __future__ import annotations

import uuid

from sqlalchemy import create_engine, pool, text

from control_plane.db.engine import sqlalchemy_url
from control_plane.db.migrate import downgrade, upgrade

_COUNTER = text(
    "INSERT INTO usage_counter (tenant_id, base_model, adapter_id, hour_at, request_kind, mix, requests,"
    " prompt_micro_tokens, completion_micro_tokens)"
    " VALUES (:tenant, 'base', NULL, '2026-11-30 10:00+00', :kind, :mix, 1, :prompt, :completion)"
)


# Rows in the columns of revision 0005 and later (today's models have more), for tests that write rows
# before upgrading.
BASE_MODEL_ROW = text(
    "INSERT INTO base_model (name, fingerprint, architecture, hidden_size, intermediate_size, num_layers,"
    " num_attention_heads, num_key_value_heads, head_dim, vocab_size, registered_at, updated_at)"
    " VALUES ('tiny', :fingerprint, 'llama', 64, 128, 2, 4, 2, 16, 256, now(), now())"
)
TENANT_ROW = text("INSERT INTO tenant (id, name, is_operator, created_at) VALUES (:id, :name, false, now())")


def _execute(url: str, *statements) -> list:
    engine = create_engine(sqlalchemy_url(url), poolclass=pool.NullPool)
    try:
        with engine.begin() as connection:
            results = [connection.execute(statement, params) for statement, params in statements]
            return [result.all() if result.returns_rows else [] for result in results]
    finally:
        engine.dispose()


def test_downgrade_folds_the_counters_of_each_kind_back_into_one_per_adapter_and_hour(
    empty_database_url: str,
) -> None:
    tenant = uuid.uuid4()
    upgrade(empty_database_url, "0003")
    _execute(empty_database_url, (TENANT_ROW, {"id": tenant, "name": "t"}))
    upgrade(empty_database_url)
    kinds = [("", "", 5, 7), ("single", "", 10, 20), ("ensemble", "a+b", 100, 200)]
    _execute(
        empty_database_url,
        *(
            (_COUNTER, {"tenant": tenant, "kind": k, "mix": m, "prompt": p, "completion": c})
            for k, m, p, c in kinds
        ),
    )
    downgrade(empty_database_url, "0003")
    [rows] = _execute(
        empty_database_url,
        (text("SELECT requests, prompt_micro_tokens, completion_micro_tokens FROM usage_counter"), {}),
    )
    assert [tuple(row) for row in rows] == [(3, 115, 227)]
    upgrade(empty_database_url)
    [rows] = _execute(
        empty_database_url,
        (text("SELECT request_kind, mix, requests FROM usage_counter"), {}),
    )
    assert [tuple(row) for row in rows] == [("", "", 3)]


def test_migration_0006_keeps_the_royalty_basis_of_existing_counters(empty_database_url: str) -> None:
    """Counters written before royalty tokens were counted apart are billed as they were: their royalty
    tokens are their completion tokens (adapter lines), none for the base model's lines."""
    upgrade(empty_database_url, "0005")
    # Rows as that revision holds them, in its columns (today's models have more).
    tenant_id, adapter_id = uuid.uuid4(), uuid.uuid4()
    _execute(
        empty_database_url,
        (BASE_MODEL_ROW, {"fingerprint": "f" * 64}),
        (TENANT_ROW, {"id": tenant_id, "name": "t"}),
        (
            text(
                "INSERT INTO adapter (id, tenant_id, name, visibility, base_model_name, base_model_fingerprint,"
                " rank, alpha, use_rslora, target_modules, sha256, size_bytes, status,"
                " royalty_micros_per_million_tokens, keep_warm, description, created_at, updated_at)"
                " VALUES (:id, :tenant, 'old', 'private', 'tiny', :fingerprint, 4, 8.0, false,"
                " ARRAY['q_proj'], :sha, 1000, 'ready', 0, false, '', now(), now())"
            ),
            {"id": adapter_id, "tenant": tenant_id, "fingerprint": "f" * 64, "sha": "a" * 64},
        ),
    )
    insert = text(
        "INSERT INTO usage_counter (tenant_id, base_model, adapter_id, hour_at, request_kind, mix, requests,"
        " prompt_micro_tokens, completion_micro_tokens)"
        " VALUES (:tenant, 'tiny', :adapter, :hour, 'linear_mix', 'a+b', 1, 5, :completion)"
    )
    _execute(
        empty_database_url,
        (
            insert,
            {
                "tenant": tenant_id,
                "adapter": adapter_id,
                "hour": "2026-11-30 10:00+00",
                "completion": 700,
            },
        ),
        (
            insert,
            {"tenant": tenant_id, "adapter": None, "hour": "2026-11-30 11:00+00", "completion": 900},
        ),
    )
    upgrade(empty_database_url)
    [rows] = _execute(
        empty_database_url,
        (
            text("SELECT completion_micro_tokens, royalty_micro_tokens FROM usage_counter ORDER BY hour_at"),
            {},
        ),
    )
    assert [tuple(row) for row in rows] == [(700, 700), (900, 0)]
