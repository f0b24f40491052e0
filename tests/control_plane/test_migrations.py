"""Migrations are reversible and match the models."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, pool, select

from control_plane.billing.service import compute_invoice
from control_plane.db.engine import make_engine, make_sessionmaker, sqlalchemy_url
from control_plane.db.migrate import (
    SchemaAheadError,
    SchemaBehindError,
    current_revision,
    downgrade,
    ensure_schema_current,
    head_revision,
    upgrade,
)
from control_plane.db.models import Base
from control_plane.errors import AdapterNotFound, Unauthenticated
from control_plane.registry.service import resolve_visible
from control_plane.tenancy.models import Tenant
from control_plane.tenancy.service import authenticate
from control_plane.usage.service import UsageReport, report_usage

ROOT = Path(__file__).resolve().parents[2]


def _tables(url: str) -> set[str]:
    engine = create_engine(sqlalchemy_url(url), poolclass=pool.NullPool)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def _schema_diff(url: str) -> list:
    engine = create_engine(sqlalchemy_url(url), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            return compare_metadata(MigrationContext.configure(connection), Base.metadata)
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade_round_trip(empty_database_url: str) -> None:
    upgrade(empty_database_url)
    assert current_revision(empty_database_url) == head_revision()
    assert _tables(empty_database_url) == set(Base.metadata.tables)
    assert _schema_diff(empty_database_url) == []

    downgrade(empty_database_url, "base")
    assert current_revision(empty_database_url) is None
    assert _tables(empty_database_url) == set()

    upgrade(empty_database_url)
    assert _schema_diff(empty_database_url) == []


def test_schema_behind_is_refused_with_a_clear_message(empty_database_url: str) -> None:
    with pytest.raises(SchemaBehindError, match="--migrate-only"):
        ensure_schema_current(empty_database_url)
    upgrade(empty_database_url)
    ensure_schema_current(empty_database_url)


# Rows as the code of revision 0001 wrote them (a real run: its control plane, admin and worker RPCs): an
# operator, an adapter owner with two public adapters, a private one and a deleted public one, a user with
# a key and a revoked key, a price, usage (one adapter, a two-adapter mix, the base model, a checkpoint of a
# stream that never finished, a deleted adapter's) and the March invoices it computed and stored.
OWNER = "b6ec931f-7ae9-4a87-84d3-5397461a5be9"
USER = "680296e9-8e5f-4142-a626-9fce566eb84a"
POET = "a2596e80-d835-4c33-996b-d8af161933cb"
CODER = "ed94b86a-dfb2-4c0d-97a5-006b90a26f49"
SECRET = "d1ecb36d-fb79-48a6-8aaf-0fdd351f32ea"
GONE = "7ee97a7a-4fbc-4fe1-a7e5-2d3dbed9f534"
USER_KEY = "olk_b12f211ef6ea_PdHTYBNNe54PKI0i_Vz8-5E08uF6sZO-dyAAySBcbDI"
REVOKED_KEY = "olk_4e53b04ba744_VkhHG3TYuoHIn9JOh_WT6-E1Vf4wvQAKVpc-W7aKo5A"
FINGERPRINT = "fa7d772ffe352a05c1074635107ea2121bfc57ef2951c772868036eac5acb132"
REVISION_0001_ROWS = f"""
INSERT INTO tenant VALUES
 ('52942614-e943-43ed-b69a-566d01989b86', 'operator', true, '2026-03-01 00:00+00'),
 ('{OWNER}', 'owner', false, '2026-03-01 00:00+00'), ('{USER}', 'user', false, '2026-03-01 00:00+00');
INSERT INTO api_key VALUES
 ('e253766d-c3ff-4b57-a044-75972c83f27b', '{USER}', 'b12f211ef6ea', 'fc4be528c857a8cf3332c321a2e1cf4c',
  'c1a210cf4b093398ce92d67028af1ceff8660ab1fcd075f7cab2c6be7ffd3d85', '{{infer}}', '2026-03-01 00:00+00',
  NULL),
 ('6242b14d-e527-4d54-96ec-7022efa801e0', '{USER}', '4e53b04ba744', 'c8bcb68b7503b8ba31c6e11de11a3d7c',
  '2ddafb1e0602f11a7c32745a6a6d0ad49e8a8368a1342f548b9ddc3600bdd14a', '{{infer}}', '2026-03-01 00:00+00',
  '2026-03-02 00:00+00');
INSERT INTO base_model VALUES ('tiny-llama', '{FINGERPRINT}', 'LlamaForCausalLM', 64, 128, 2, 4, 2, 16, 128,
 '2026-03-01 00:00+00', '2026-03-01 00:00+00');
INSERT INTO worker VALUES ('w-old', '127.0.0.1:9', 'tiny-llama', 64, 8, '2026-03-01 00:00+00',
 '2026-03-01 00:00+00', 0, 0, 0);
INSERT INTO adapter VALUES
 ('{POET}', '{OWNER}', 'poet', 'public', 'tiny-llama', '{FINGERPRINT}', 8, 16, false, '{{q_proj,v_proj}}',
  'df8822b2ff261418533f04d528d9406c514c5641afefbd9cd1427b1912027316', 16551, 'ready', 2000000, false, '',
  '2026-03-01 00:01+00', '2026-03-01 00:01+00', NULL),
 ('{CODER}', '{OWNER}', 'coder', 'public', 'tiny-llama', '{FINGERPRINT}', 4, 8, false, '{{q_proj,o_proj}}',
  '0cc2afe05ab55252ee20543708ca43f16c7a78ed7b08c8dd1a777e5481294d67', 10398, 'ready', 1000000, false, '',
  '2026-03-01 00:02+00', '2026-03-01 00:02+00', NULL),
 ('{SECRET}', '{OWNER}', 'secret', 'private', 'tiny-llama', '{FINGERPRINT}', 4, 8, false, '{{q_proj,o_proj}}',
  '0cc2afe05ab55252ee20543708ca43f16c7a78ed7b08c8dd1a777e5481294d67', 10398, 'ready', 0, false, '',
  '2026-03-01 00:03+00', '2026-03-01 00:03+00', NULL),
 ('{GONE}', '{OWNER}', 'gone', 'public', 'tiny-llama', '{FINGERPRINT}', 8, 16, false, '{{q_proj,v_proj}}',
  'df8822b2ff261418533f04d528d9406c514c5641afefbd9cd1427b1912027316', 16551, 'deleted', 0, false, '',
  '2026-03-01 00:04+00', '2026-03-20 00:00+00', '2026-03-20 00:00+00');
INSERT INTO price VALUES ('tiny-llama', 100000, 300000, '2026-03-01 00:00+00');
INSERT INTO usage_event VALUES
 ('r1', '{USER}', 'w-old', 'tiny-llama', 1000, 2000, 0, 1, 2, 'stop', '2026-03-14 10:30+00', '2026-03-14 10:30+00'),
 ('r2', '{USER}', 'w-old', 'tiny-llama', 400, 800, 0, 1, 2, 'stop', '2026-03-14 10:30+00', '2026-03-14 10:30+00'),
 ('r3', '{USER}', 'w-old', 'tiny-llama', 55, 10, 0, 1, 2, 'stop', '2026-03-14 10:30+00', '2026-03-14 10:30+00'),
 ('r5', '{USER}', 'w-old', 'tiny-llama', 7, 9, 0, 1, 2, 'stop', '2026-03-14 10:30+00', '2026-03-14 10:30+00'),
 ('r6', '{USER}', 'w-old', 'tiny-llama', 30, 40, 0, 1, 2, 'interrupted', '2026-03-14 10:30+00',
  '2026-03-14 10:30+00'),
 ('r7', '{USER}', 'w-old', 'tiny-llama', 1, 1, 0, 1, 2, 'stop', '2026-04-02 08:00+00', '2026-04-02 08:00+00'),
 ('r4', '{OWNER}', 'w-old', 'tiny-llama', 100, 100, 0, 1, 2, 'stop', '2026-03-14 10:30+00',
  '2026-03-14 10:30+00');
INSERT INTO usage_event_adapter VALUES ('{USER}', 'r1', '{POET}', 1), ('{USER}', 'r2', '{POET}', 0.25),
 ('{USER}', 'r2', '{CODER}', 0.75), ('{USER}', 'r5', '{GONE}', 1), ('{USER}', 'r6', '{CODER}', 1),
 ('{OWNER}', 'r4', '{SECRET}', 1);
INSERT INTO usage_counter
 (tenant_id, base_model, adapter_id, hour_at, requests, prompt_micro_tokens, completion_micro_tokens) VALUES
 ('{USER}', 'tiny-llama', '{GONE}', '2026-03-14 10:00+00', 1, 7000000, 9000000),
 ('{USER}', 'tiny-llama', NULL, '2026-03-14 10:00+00', 1, 55000000, 10000000),
 ('{USER}', 'tiny-llama', NULL, '2026-04-02 08:00+00', 1, 1000000, 1000000),
 ('{USER}', 'tiny-llama', '{POET}', '2026-03-14 10:00+00', 2, 1100000000, 2200000000),
 ('{USER}', 'tiny-llama', '{CODER}', '2026-03-14 10:00+00', 2, 330000000, 640000000),
 ('{OWNER}', 'tiny-llama', '{SECRET}', '2026-03-14 10:00+00', 1, 100000000, 100000000);
INSERT INTO invoice VALUES
 ('87085815-1164-440e-a89a-60da4487715f', '{OWNER}', '2026-03', 40, 5040, -5000, '2026-04-01 00:00+00'),
 ('1bb0ea6b-55a0-47e5-b05d-73b01d54f3c4', '{USER}', '2026-03', 6046, 0, 6046, '2026-04-01 00:00+00');
INSERT INTO invoice_line (invoice_id, kind, base_model, adapter, prompt_tokens, completion_tokens, amount_micros)
VALUES
 ('87085815-1164-440e-a89a-60da4487715f', 'tokens', 'tiny-llama', 'secret', 100, 100, 40),
 ('87085815-1164-440e-a89a-60da4487715f', 'royalty_earned', 'tiny-llama', 'coder', 0, 640, 640),
 ('87085815-1164-440e-a89a-60da4487715f', 'royalty_earned', 'tiny-llama', 'poet', 0, 2200, 4400),
 ('1bb0ea6b-55a0-47e5-b05d-73b01d54f3c4', 'tokens', 'tiny-llama', '', 55, 10, 8),
 ('1bb0ea6b-55a0-47e5-b05d-73b01d54f3c4', 'tokens', 'tiny-llama', 'coder', 330, 640, 225),
 ('1bb0ea6b-55a0-47e5-b05d-73b01d54f3c4', 'tokens', 'tiny-llama', 'gone', 7, 9, 3),
 ('1bb0ea6b-55a0-47e5-b05d-73b01d54f3c4', 'tokens', 'tiny-llama', 'poet', 1100, 2200, 770),
 ('1bb0ea6b-55a0-47e5-b05d-73b01d54f3c4', 'royalty_paid', 'tiny-llama', 'coder', 0, 640, 640),
 ('1bb0ea6b-55a0-47e5-b05d-73b01d54f3c4', 'royalty_paid', 'tiny-llama', 'poet', 0, 2200, 4400);
"""
# What revision 0001's code answered for March: (kind, adapter, prompt, completion, amount) per line.
MARCH_LINES = {
    "owner": {
        ("tokens", "secret", 100, 100, 40),
        ("royalty_earned", "coder", 0, 640, 640),
        ("royalty_earned", "poet", 0, 2200, 4400),
    },
    "user": {
        ("tokens", "", 55, 10, 8),
        ("tokens", "coder", 330, 640, 225),
        ("tokens", "gone", 7, 9, 3),
        ("tokens", "poet", 1100, 2200, 770),
        ("royalty_paid", "coder", 0, 640, 640),
        ("royalty_paid", "poet", 0, 2200, 4400),
    },
}
REVISIONS = ["0001", "0002", "0003", "0004", "0005", "0006", "0007", "0008", "0009", "0010"]


def _execute(url: str, sql: str) -> None:
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(sql)


def _scalar(url: str, sql: str):
    with psycopg.connect(url) as connection:
        return connection.execute(sql).fetchone()[0]


def _counters(url: str) -> list[tuple]:
    with psycopg.connect(url) as connection:
        return connection.execute(
            "SELECT tenant_id::text, adapter_id::text, hour_at, sum(requests), sum(prompt_micro_tokens),"
            " sum(completion_micro_tokens) FROM usage_counter GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
        ).fetchall()


def _march_invoice(session, tenant_name: str):
    return compute_invoice(
        session, session.scalar(select(Tenant).where(Tenant.name == tenant_name)), "2026-03"
    )


def _assert_revision_0001_rows_mean_the_same(url: str) -> None:
    engine = make_engine(url)
    try:
        with make_sessionmaker(engine)() as session:
            assert authenticate(session, USER_KEY).tenant_name == "user"
            with pytest.raises(Unauthenticated):
                authenticate(session, REVOKED_KEY)
            user = uuid.UUID(USER)
            assert [str(resolve_visible(session, user, n).id) for n in ("poet", "coder")] == [POET, CODER]
            for hidden in ("secret", "gone"):  # another tenant's private adapter, a deleted one
                with pytest.raises(AdapterNotFound):
                    resolve_visible(session, user, hidden)
            assert str(resolve_visible(session, uuid.UUID(OWNER), "secret").id) == SECRET
            for tenant_name, figures in (("owner", (40, 5040, -5000)), ("user", (6046, 0, 6046))):
                invoice = _march_invoice(session, tenant_name)
                assert (invoice.charges_micros, invoice.earnings_micros, invoice.net_micros) == figures
                assert {
                    (line.kind, line.adapter, line.prompt_tokens, line.completion_tokens, line.amount_micros)
                    for line in invoice.lines
                } == MARCH_LINES[tenant_name]
            session.rollback()
    finally:
        engine.dispose()


def test_rows_of_the_first_schema_mean_the_same_after_each_upgrade_and_downgrade(
    empty_database_url: str,
) -> None:
    url = empty_database_url
    upgrade(url, "0001")
    _execute(url, REVISION_0001_ROWS)
    counters = _counters(url)
    for revision in REVISIONS[1:]:
        upgrade(url, revision)
        assert _counters(url) == counters, revision
    assert _schema_diff(url) == []
    _assert_revision_0001_rows_mean_the_same(url)
    assert _scalar(
        url, "SELECT string_agg(name, ',' ORDER BY name) FROM adapter WHERE published_at IS NOT NULL"
    ) == ("coder,poet")
    # Down to each earlier revision and up again: nothing these rows hold is lost on the way.
    for revision in reversed(REVISIONS[:-1]):
        downgrade(url, revision)
        assert current_revision(url) == revision
        assert _counters(url) == counters, revision
        upgrade(url)
        assert _schema_diff(url) == []
        _assert_revision_0001_rows_mean_the_same(url)


def test_a_final_record_replaces_a_checkpoint_stored_before_request_kinds(empty_database_url: str) -> None:
    url = empty_database_url
    upgrade(url, "0001")
    _execute(url, REVISION_0001_ROWS)
    upgrade(url)
    final = UsageReport(
        request_id="r6",
        tenant_id=USER,
        adapters=((CODER, 1.0),),
        worker_id="w-old",
        base_model="tiny-llama",
        prompt_tokens=30,
        completion_tokens=60,
        finished_at=datetime(2026, 3, 14, 10, 30, tzinfo=UTC),
        finish_reason="stop",
        request_kind="single",
    )
    engine = make_engine(url)
    try:
        with make_sessionmaker(engine)() as session:
            assert report_usage(session, [final]).superseded == 1
            session.commit()
            invoice = _march_invoice(session, "user")
    finally:
        engine.dispose()
    coder_micro_tokens = _scalar(
        url, f"SELECT sum(completion_micro_tokens) FROM usage_counter WHERE adapter_id = '{CODER}'"
    )
    assert coder_micro_tokens == 660_000_000  # 640 before, the checkpoint's 40 replaced by the final's 60
    assert sum(line.completion_tokens for line in invoice.lines if line.kind == "tokens") == 2859 + 20


def _linear_mix_usage(url: str) -> None:
    """One linear mix of poet and coder at weights 0.25 / 0.75: each earns its royalty on all 800 tokens."""
    mix = UsageReport(
        request_id="m1",
        tenant_id=USER,
        adapters=((POET, 0.25), (CODER, 0.75)),
        worker_id="w-old",
        base_model="tiny-llama",
        prompt_tokens=400,
        completion_tokens=800,
        finished_at=datetime(2026, 3, 15, 9, 0, tzinfo=UTC),
        finish_reason="stop",
        request_kind="linear_mix",
    )
    engine = make_engine(url)
    try:
        with make_sessionmaker(engine)() as session:
            assert report_usage(session, [mix]).inserted == 1
            session.commit()
    finally:
        engine.dispose()


def test_a_downgrade_that_would_lower_royalties_earned_is_refused_and_changes_nothing(
    empty_database_url: str,
) -> None:
    url = empty_database_url
    upgrade(url, "0001")
    _execute(url, REVISION_0001_ROWS)
    upgrade(url)
    _linear_mix_usage(url)
    engine = make_engine(url)
    try:
        with make_sessionmaker(engine)() as session:
            earned = _march_invoice(session, "owner").earnings_micros
            session.rollback()
    finally:
        engine.dispose()
    with pytest.raises(RuntimeError, match="refusing to downgrade below revision 0006: 2 hourly usage line"):
        downgrade(url, "0005")
    # One transaction: the steps above 0006 that had run are undone too, nothing half way.
    assert current_revision(url) == head_revision()
    assert _schema_diff(url) == []
    engine = make_engine(url)
    try:
        with make_sessionmaker(engine)() as session:
            assert _march_invoice(session, "owner").earnings_micros == earned
            session.rollback()
    finally:
        engine.dispose()
    downgrade(url, "0006")  # down to the revision that still holds it is fine
    assert current_revision(url) == "0006"


def test_schema_ahead_of_this_code_is_refused_with_a_clear_message(empty_database_url: str) -> None:
    url = empty_database_url
    upgrade(url)
    _execute(url, "UPDATE alembic_version SET version_num = '0099'")
    for call in (upgrade, ensure_schema_current, downgrade):
        with pytest.raises(SchemaAheadError, match="at revision 0099, which this version does not know"):
            call(url)
    assert current_revision(url) == "0099"
    assert _schema_diff(url) == []


def _waiting_on_locks(url: str) -> int:
    return _scalar(
        url,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )


def _migrate_only(url: str, state_dir: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENLORA_")}
    return subprocess.Popen(
        [sys.executable, "-m", "openlora.cli", "control-plane", "--database-url", url, "--migrate-only",
         "--state-dir", str(state_dir)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip


def test_control_planes_migrating_at_once_apply_each_step_once(
    empty_database_url: str, tmp_path: Path
) -> None:
    """Two control planes that start while a step is held up (a rolling upgrade starts replicas together):
    the second waits for the first and then finds nothing to apply; before, both applied the step and one
    failed on the column the other had added."""
    url = empty_database_url
    upgrade(url, "0009")
    with psycopg.connect(url) as holder:
        holder.execute("LOCK TABLE worker IN ACCESS EXCLUSIVE MODE")  # 0010 alters worker: both runs stop
        runs = [_migrate_only(url, tmp_path / f"cp{i}") for i in range(2)]
        while _waiting_on_locks(url) < 2:
            time.sleep(0.05)
        holder.rollback()
    outcomes = [(run.wait(120), run.stderr.read()) for run in runs]
    assert [code for code, _ in outcomes] == [0, 0], outcomes
    assert current_revision(url) == head_revision()
    assert _schema_diff(url) == []
