"""Tenants and API keys: bootstrap, authentication, creation and revocation.

Every function takes an open `Session` inside the caller's transaction and raises domain errors."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import any_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from control_plane.db.base import utc_now
from control_plane.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    TenantNotFound,
    Unauthenticated,
)
from control_plane.tenancy import keys
from control_plane.tenancy.caller import Caller
from control_plane.tenancy.models import OPERATOR_TENANT, SCOPE_ADMIN, SCOPE_INFER, ApiKey, Tenant
from control_plane.text import check_text
from openlora.text_rules import TENANT_NAME, TENANT_NAME_RULE

_UNKNOWN_KEY = "unknown or revoked api key"
MAX_KEY_ID_CHARS = 64


@dataclass(frozen=True)
class Bootstrap:
    operator: Tenant
    # The plaintext of a newly created bootstrap key; None when one already existed.
    new_admin_key: str | None
    # The row of the key this control plane was configured with (or made): not revocable through it, since
    # it could not start again with that key revoked. None when no key is configured and one existed.
    admin_key_id: uuid.UUID | None = None


def ensure_operator(session: Session, admin_key: str | None) -> Bootstrap:
    """Creates the operator tenant on first start, and its admin key: `admin_key` when given (kept in
    sync if it changed), else a generated one returned once."""
    operator = session.scalar(select(Tenant).where(Tenant.is_operator.is_(True)))
    if operator is None:
        operator = Tenant(name=OPERATOR_TENANT, is_operator=True)
        session.add(operator)
        session.flush()
    if admin_key is not None:
        prefix = keys.lookup_prefix(admin_key)
        existing = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
        if existing is not None and keys.matches(admin_key, existing.salt_hex, existing.secret_hash_hex):
            if existing.revoked_at is not None or existing.tenant_id != operator.id:
                raise PermissionDenied(
                    "the configured admin key (OPENLORA_ADMIN_KEY) was revoked or belongs to another tenant: "
                    "configure another key"
                )
            return Bootstrap(operator, None, existing.id)
        if existing is not None:
            raise AlreadyExists("another key already uses the configured admin key's prefix")
        row = _store_key(session, operator.id, admin_key, [SCOPE_ADMIN, SCOPE_INFER])
        return Bootstrap(operator, admin_key, row.id)
    has_admin_key = session.scalar(
        select(ApiKey.id).where(
            ApiKey.tenant_id == operator.id,
            ApiKey.revoked_at.is_(None),
            any_(ApiKey.scopes) == SCOPE_ADMIN,
        )
    )
    if has_admin_key is not None:
        return Bootstrap(operator, None)
    plaintext = keys.generate_key()
    row = _store_key(session, operator.id, plaintext, [SCOPE_ADMIN, SCOPE_INFER])
    return Bootstrap(operator, plaintext, row.id)


def _store_key(session: Session, tenant_id: uuid.UUID, plaintext: str, scopes: list[str]) -> ApiKey:
    hashed = keys.hashed(plaintext)
    row = ApiKey(
        tenant_id=tenant_id,
        prefix=hashed.prefix,
        salt_hex=hashed.salt_hex,
        secret_hash_hex=hashed.secret_hash_hex,
        scopes=scopes,
    )
    session.add(row)
    session.flush()
    return row


def authenticate(session: Session, api_key: str) -> Caller:
    """Resolves a key to its caller; UNAUTHENTICATED when empty, unknown or revoked."""
    if not api_key:
        raise Unauthenticated("missing api key: send `authorization: Bearer <api key>`")
    # The key and its tenant in one round trip: every authenticated call (each Authorize) pays it.
    found = session.execute(
        select(ApiKey, Tenant)
        .join(Tenant, Tenant.id == ApiKey.tenant_id)
        .where(ApiKey.prefix == keys.lookup_prefix(api_key))
    ).first()
    if found is None:
        raise Unauthenticated(_UNKNOWN_KEY)
    row, tenant = found
    if not keys.matches(api_key, row.salt_hex, row.secret_hash_hex) or row.revoked_at:
        raise Unauthenticated(_UNKNOWN_KEY)
    return Caller(row.id, tenant.id, tenant.name, tenant.is_operator, tuple(row.scopes))


def authenticate_admin(session: Session, api_key: str) -> Caller:
    caller = authenticate(session, api_key)
    if not caller.is_admin:
        raise PermissionDenied("this key lacks the admin scope")
    return caller


def require_operator(caller: Caller) -> None:
    if not caller.is_operator:
        raise PermissionDenied("only an operator admin key may do this")


def tenant_for(session: Session, caller: Caller, tenant_name: str) -> Tenant:
    """The tenant an admin call acts for: the caller's own when `tenant_name` is empty or its own name;
    any tenant for an operator; PERMISSION_DENIED otherwise."""
    if not tenant_name or tenant_name == caller.tenant_name:
        return session.get(Tenant, caller.tenant_id)
    if not TENANT_NAME.fullmatch(tenant_name):
        raise InvalidArgument(f"must be {TENANT_NAME_RULE}", field="tenant")
    require_operator(caller)
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        raise TenantNotFound(tenant_name)
    return tenant


def create_tenant(session: Session, caller: Caller, name: str) -> Tenant:
    require_operator(caller)
    if not TENANT_NAME.fullmatch(name):
        raise InvalidArgument(f"must be {TENANT_NAME_RULE}", field="name")
    if session.scalar(select(Tenant.id).where(Tenant.name == name)) is not None:
        raise AlreadyExists(f"tenant {name!r} already exists", field="name")
    tenant = Tenant(name=name, is_operator=False)
    session.add(tenant)
    try:
        session.flush()
    except IntegrityError:  # another CreateTenant of the name committed after the check above
        raise AlreadyExists(f"tenant {name!r} already exists", field="name") from None
    return tenant


def create_api_key(
    session: Session, caller: Caller, tenant_name: str, scopes: list[str]
) -> tuple[ApiKey, str]:
    """Returns the stored key and its plaintext (shown once)."""
    tenant = tenant_for(session, caller, tenant_name)
    wanted = sorted(set(scopes) or {SCOPE_INFER})
    plaintext = keys.generate_key()
    return _store_key(session, tenant.id, plaintext, wanted), plaintext


def keys_revoked_since(session: Session, since: datetime, limit: int) -> list[uuid.UUID]:
    """The ids of the keys revoked at or after `since`, the newest first, at most `limit`."""
    return list(
        session.scalars(
            select(ApiKey.id)
            .where(ApiKey.revoked_at >= since)
            .order_by(ApiKey.revoked_at.desc(), ApiKey.id)
            .limit(limit)
        )
    )


def revoke_api_key(
    session: Session, caller: Caller, key_id: str, configured_key_id: uuid.UUID | None = None
) -> ApiKey:
    """Revokes a key by id or display prefix; a tenant admin may revoke only its own tenant's keys.

    Two operator keys are not revoked (FAILED_PRECONDITION): `configured_key_id`, the key the control plane
    was started with (it would not start again: `ensure_operator`), and the operator's last admin key
    (nobody could administer the system any more)."""
    row = _find_key(session, key_id)
    if row is None or (not caller.is_operator and row.tenant_id != caller.tenant_id):
        raise NotFound("no such api key", field="key_id")
    if row.revoked_at is not None:
        return row
    if row.id == configured_key_id:
        raise FailedPrecondition(
            "this is the admin key the control plane was started with (OPENLORA_ADMIN_KEY, or the operator key "
            "`openlora up` keeps in its state dir): restart it with "
            "another operator admin key first, then revoke this one",
            field="key_id",
        )
    # The tenant row is locked first, so that concurrent revocations of its keys run one at a time: each
    # then sees what the one before revoked (locking the other keys instead deadlocked two revocations).
    owner = session.get(Tenant, row.tenant_id, with_for_update=True, populate_existing=True)
    if SCOPE_ADMIN in row.scopes and owner.is_operator:
        others = session.scalar(
            select(ApiKey.id)
            .where(
                ApiKey.tenant_id == row.tenant_id,
                ApiKey.id != row.id,
                ApiKey.revoked_at.is_(None),
                any_(ApiKey.scopes) == SCOPE_ADMIN,
            )
            .limit(1)
        )
        if others is None:
            raise FailedPrecondition(
                "this is the operator's last admin key: create another one first", field="key_id"
            )
    row.revoked_at = utc_now()
    return row


def _find_key(session: Session, key_id: str) -> ApiKey | None:
    if not key_id:
        raise InvalidArgument("required", field="key_id")
    check_text(key_id, "key_id", MAX_KEY_ID_CHARS)
    try:
        return session.get(ApiKey, uuid.UUID(key_id))
    except ValueError:
        pass
    # Its display prefix (`olk_<prefix>`), else the key itself: the whole key as `up` prints it, or an
    # operator's key of its own format, whose prefix is derived from its digest and shown nowhere.
    for prefix in (key_id.removeprefix(keys.KEY_PREFIX), keys.lookup_prefix(key_id)):
        row = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
        if row is not None:
            return row
    return None


def tenant_name(session: Session, tenant_id: uuid.UUID) -> str:
    return session.get(Tenant, tenant_id).name
