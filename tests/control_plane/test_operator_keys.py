"""The operator cannot lock itself out: the admin key a control plane was started with, and the operator's
last admin key, are not revoked (FAILED_PRECONDITION naming key_id). Revoking the started-with key let the
revocation succeed and every later start of that control plane fail (`ensure_operator` refuses a revoked
configured key), with the admin API down for good. Own module: it revokes operator keys."""

from __future__ import annotations

import grpc
import pytest
from sqlalchemy import select

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


def test_concurrent_revocations_of_the_last_two_admin_keys_leave_one(cp) -> None:
    """Both revocations checked before either committed: each locked the other key and then wrote its own,
    so Postgres broke the deadlock by failing one (UNAVAILABLE, 'database unavailable'). The tenant row is
    locked first now: one revokes, the other is refused as the last admin key."""
    import contextlib
    import threading

    from sqlalchemy import update

    from control_plane.db.base import utc_now
    from control_plane.tenancy import service as tenancy
    from control_plane.tenancy.models import ApiKey

    sessions = cp.running.app.sessions
    started_with = cp.running.app.admin_key_id
    with sessions.begin() as s:  # whatever the tests before did to it
        s.execute(update(ApiKey).where(ApiKey.id == started_with).values(revoked_at=None))
    with cp.admin() as admin:
        b, c = (admin.create_api_key(OPERATOR_TENANT, admin=True) for _ in range(2))
    with sessions.begin() as s:  # only b and c are left
        s.execute(
            update(ApiKey)
            .where(ApiKey.id.not_in([b.key.id, c.key.id]), ApiKey.revoked_at.is_(None))
            .values(revoked_at=utc_now())
        )
    barrier, outcomes = threading.Barrier(2), {}

    def revoke(name: str, secret: str, key_id: str) -> None:
        try:
            with sessions.begin() as s:
                tenancy.revoke_api_key(s, tenancy.authenticate_admin(s, secret), key_id)
                with contextlib.suppress(threading.BrokenBarrierError):  # one may wait on the other's lock
                    barrier.wait(timeout=2)  # both checked, neither committed
            outcomes[name] = "revoked"
        except Exception as error:
            outcomes[name] = type(error).__name__

    try:
        threads = [
            threading.Thread(target=revoke, args=("b", c.secret, b.key.id)),
            threading.Thread(target=revoke, args=("c", b.secret, c.key.id)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert sorted(outcomes.values()) == ["FailedPrecondition", "revoked"], outcomes
        with sessions() as s:
            live = s.scalars(
                select(ApiKey.id).where(ApiKey.id.in_([b.key.id, c.key.id]), ApiKey.revoked_at.is_(None))
            )
            assert len(list(live)) == 1
    finally:
        with sessions.begin() as s:
            s.execute(update(ApiKey).where(ApiKey.id == started_with).values(revoked_at=None))


def test_a_key_is_revoked_by_its_whole_text_as_well_as_by_its_display_prefix(cp, server_thread) -> None:
    """`up` prints whole keys (the ready line's, its operator key), never their display prefix; `keys
    revoke <whole key>` was NOT_FOUND, and an operator key of its own format (its prefix a digest, shown
    nowhere) could not be named at all. The whole key names it now; a key's secret part alone does not."""
    with cp.admin() as admin:
        admin.create_tenant("wholekey")
        made = admin.create_api_key("wholekey")
        with pytest.raises(grpc.RpcError) as refused:
            admin.revoke_api_key(made.secret.rsplit("_", 1)[-1])
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        assert admin.revoke_api_key(made.secret).HasField("revoked_at")
    # An operator key of its own format, configured on a control plane: found by its text, and refused
    # there for what it is (the started-with key), not as an unknown key.
    from dataclasses import replace

    own = "operator-chosen-key-0123456789"
    other = server_thread.run(serve(replace(cp.config, admin_key=own)))
    try:
        with AdminClient(other.target, own) as admin, pytest.raises(grpc.RpcError) as refused:
            admin.revoke_api_key(own)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        server_thread.run(other.stop(0))
