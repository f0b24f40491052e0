"""Migration 0008 (public names belong to their first publisher) keeps what callers reach: of a name's
public adapters, the one the old rule served (the oldest READY one) becomes the name's claimant; a
deleted older one, or a later one of the same name, claims nothing."""

from __future__ import annotations

import uuid

from sqlalchemy import text

from control_plane.db.migrate import upgrade
from tests.control_plane.test_usage_kind_migration import BASE_MODEL_ROW, TENANT_ROW, _execute

_ADAPTER = text(
    "INSERT INTO adapter (id, tenant_id, name, visibility, base_model_name, base_model_fingerprint, rank,"
    " alpha, use_rslora, target_modules, sha256, size_bytes, status, royalty_micros_per_million_tokens,"
    " keep_warm, description, created_at, updated_at)"
    " VALUES (:id, :tenant, 'x', 'public', 'tiny', :fingerprint, 4, 8.0, false, ARRAY['q_proj'], :sha, 1000,"
    " :status, 0, false, '', :created_at, :created_at)"
)


def test_the_adapter_callers_reach_today_keeps_the_name(empty_database_url: str) -> None:
    upgrade(empty_database_url, "0007")
    tenants = [uuid.uuid4() for _ in range(3)]
    rows = [  # (tenant, status, created_at): a deleted first publisher, the one served, a later one
        (tenants[0], "deleted", "2026-11-01 00:00+00"),
        (tenants[1], "ready", "2026-11-02 00:00+00"),
        (tenants[2], "ready", "2026-11-03 00:00+00"),
    ]
    ids = [uuid.uuid4() for _ in rows]
    _execute(
        empty_database_url,
        (BASE_MODEL_ROW, {"fingerprint": "f" * 64}),
        *((TENANT_ROW, {"id": tenant, "name": f"t{i}"}) for i, tenant in enumerate(tenants)),
        *(
            (
                _ADAPTER,
                {
                    "id": adapter_id,
                    "tenant": tenant,
                    "fingerprint": "f" * 64,
                    "sha": uuid.uuid4().hex * 2,
                    "status": status,
                    "created_at": created_at,
                },
            )
            for adapter_id, (tenant, status, created_at) in zip(ids, rows, strict=True)
        ),
    )
    upgrade(empty_database_url)
    [published] = _execute(
        empty_database_url, (text("SELECT id FROM adapter WHERE published_at IS NOT NULL"), {})
    )
    assert [row[0] for row in published] == [ids[1]]
