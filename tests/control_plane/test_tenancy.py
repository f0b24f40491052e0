"""Tenants and API keys through AdminService: creation, scopes, revocation, operator rights."""

from __future__ import annotations

import grpc
import pytest

from openlora.admin_client import AdminClient
from openlora.v1 import admin_pb2


def _code(excinfo: pytest.ExceptionInfo) -> grpc.StatusCode:
    return excinfo.value.code()


def test_bootstrap_admin_key_is_written_once_to_a_private_file(cp) -> None:
    path = cp.running.admin_key_path
    assert path.read_text().strip() == cp.admin_key
    assert path.stat().st_mode & 0o777 == 0o600


def test_operator_creates_tenant_and_keys(cp) -> None:
    with cp.admin() as admin:
        tenant = admin.create_tenant("acme")
        assert tenant.name == "acme" and not tenant.is_operator
        created = admin.create_api_key("acme", admin=True)
        assert created.secret.startswith(created.key.prefix + "_")
        assert created.key.tenant == "acme"
        assert set(created.key.scopes) == {admin_pb2.SCOPE_INFER, admin_pb2.SCOPE_ADMIN}
    with cp.admin(created.secret) as acme:
        infer_key = acme.create_api_key()
        assert list(infer_key.key.scopes) == [admin_pb2.SCOPE_INFER]
        assert infer_key.key.tenant == "acme"


def test_duplicate_tenant_is_already_exists_and_bad_name_is_invalid(cp) -> None:
    with cp.admin() as admin:
        admin.create_tenant("dup")
        with pytest.raises(grpc.RpcError) as e:
            admin.create_tenant("dup")
        assert _code(e) == grpc.StatusCode.ALREADY_EXISTS
        with pytest.raises(grpc.RpcError) as e:
            admin.create_tenant("bad name/")
        assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT
        assert "name" in e.value.details()


def test_tenant_admin_cannot_act_for_other_tenants_or_create_tenants(cp) -> None:
    with cp.admin() as admin:
        admin.create_tenant("t1")
        admin.create_tenant("t2")
        t1_admin = admin.create_api_key("t1", admin=True).secret
    with cp.admin(t1_admin) as t1:
        for call in (lambda: t1.create_api_key("t2"), lambda: t1.create_tenant("t3"), t1.list_workers):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert _code(e) == grpc.StatusCode.PERMISSION_DENIED


def test_infer_key_is_refused_admin_calls(cp) -> None:
    with cp.admin() as admin:
        admin.create_tenant("inferonly")
        secret = admin.create_api_key("inferonly").secret
    with cp.admin(secret) as client, pytest.raises(grpc.RpcError) as e:
        list(client.list_adapters())
    assert _code(e) == grpc.StatusCode.PERMISSION_DENIED


def test_revoked_and_unknown_keys_are_unauthenticated(cp) -> None:
    with cp.admin() as admin:
        admin.create_tenant("rev")
        created = admin.create_api_key("rev", admin=True)
        revoked = admin.revoke_api_key(created.key.prefix)
        assert revoked.HasField("revoked_at")
    for key in (created.secret, "olk_0123456789ab_not-a-real-secret-at-all", ""):
        with AdminClient(cp.target, key) as client, pytest.raises(grpc.RpcError) as e:
            client.create_api_key()
        assert _code(e) == grpc.StatusCode.UNAUTHENTICATED


def test_revoke_by_id_and_unknown_key_is_not_found(cp) -> None:
    with cp.admin() as admin:
        created = admin.create_api_key()
        assert admin.revoke_api_key(created.key.id).id == created.key.id
        with pytest.raises(grpc.RpcError) as e:
            admin.revoke_api_key("olk_ffffffffffff")
        assert _code(e) == grpc.StatusCode.NOT_FOUND


def test_keys_are_stored_only_as_salted_hashes(cp) -> None:
    import psycopg

    with cp.admin() as admin:
        secret = admin.create_api_key().secret
    with psycopg.connect(cp.config.database_url) as conn:
        rows = conn.execute("SELECT prefix, salt_hex, secret_hash_hex FROM api_key").fetchall()
    flat = " ".join(" ".join(r) for r in rows)
    assert secret not in flat and secret.split("_", 2)[2] not in flat
    assert len({r[1] for r in rows}) == len(rows)  # one salt per key


def test_concurrent_creates_of_one_tenant_name_make_it_once_and_refuse_the_rest(cp) -> None:
    """Each create checked the name free, then inserted: the losers of the race hit the unique constraint
    and answered INTERNAL instead of ALREADY_EXISTS."""
    import threading
    import uuid

    def create(name: str, barrier: threading.Barrier, codes: list, refusals: list) -> None:
        with cp.admin() as admin:
            barrier.wait()
            try:
                admin.create_tenant(name)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as error:
                codes.append(error.code())
                refusals.append(error.details())  # asserted below: an assert in a thread fails no test

    for _ in range(5):
        name, barrier, codes, refusals = f"race-{uuid.uuid4().hex[:8]}", threading.Barrier(8), [], []
        threads = [threading.Thread(target=create, args=(name, barrier, codes, refusals)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert codes.count(grpc.StatusCode.ALREADY_EXISTS) == 7 and grpc.StatusCode.OK in codes, codes
        assert refusals == [f"name: tenant {name!r} already exists"] * 7, refusals
