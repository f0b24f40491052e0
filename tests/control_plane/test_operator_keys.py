"""The operator cannot lock itself out: the admin key a control plane was started with, and the operator's
last admin key, are not revoked (FAILED_PRECONDITION naming key_id). Revoking the started-with key let the
revocation succeed and every later start of that control plane fail (`ensure_operator` refuses a revoked
configured key), with the admin API down for good. Own module: it revokes operator keys."""

from __future__ import annotations

import grpc
import pytest

from control_plane.server.server import serve
from control_plane.tenancy.models import OPERATOR_TENANT
from openlora.admin_client import AdminClient


def test_the_started_with_key_and_the_operators_last_admin_key_are_not_revoked(cp, server_thread) -> None:
    started_with = str(cp.running.app.admin_key_id)
    with cp.admin() as admin:
        second = admin.create_api_key(OPERATOR_TENANT, admin=True)
        with pytest.raises(grpc.RpcError) as refused:
            admin.revoke_api_key(started_with)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert refused.value.details().startswith(
            "key_id: this is the admin key the control plane was started"
        )
        admin.create_api_key()  # the key still works
    with cp.admin(second.secret) as admin, pytest.raises(grpc.RpcError) as refused:
        admin.revoke_api_key(started_with)  # whoever asks
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    # A second control plane over the same database, started without a configured key, protects none: the
    # started-with key of the first is revocable there while another operator admin key remains.
    other = server_thread.run(serve(cp.config))
    try:
        assert other.app.admin_key_id is None
        with AdminClient(other.target, second.secret) as admin:
            assert admin.revoke_api_key(started_with).HasField("revoked_at")
            with pytest.raises(grpc.RpcError) as refused:
                admin.revoke_api_key(second.key.id)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "the operator's last admin key: create another one first" in refused.value.details()
            third = admin.create_api_key(OPERATOR_TENANT, admin=True)
            assert admin.revoke_api_key(second.key.id).HasField("revoked_at")  # not the last one any more
        with AdminClient(other.target, third.secret) as admin:
            tenant_key = admin.create_api_key(OPERATOR_TENANT)  # an infer-only key is not an admin key
            assert admin.revoke_api_key(tenant_key.key.id).HasField("revoked_at")
    finally:
        server_thread.run(other.stop(0))
