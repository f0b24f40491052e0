"""Adapter registry operations inside one transaction: resolution by visibility, listing, deletion, and
recording a validated upload."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import and_, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from control_plane.db.base import lock_until_commit, utc_now
from control_plane.errors import AdapterNotFound, AlreadyExists, InvalidArgument
from control_plane.registry.models import (
    STATUS_DELETED,
    STATUS_READY,
    VISIBILITY_PRIVATE,
    VISIBILITY_PUBLIC,
    Adapter,
)
from control_plane.registry.page_token import decode_page_token, encode_page_token
from control_plane.tenancy.models import Tenant
from control_plane.workers.models import BaseModelRow
from openlora.adapter_format import AdapterInfo
from openlora.cache_scope import cache_scope
from openlora.names import ADAPTER_NAME, ADAPTER_NAME_RULE

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


@dataclass(frozen=True)
class OwnedAdapter:
    adapter: Adapter
    tenant_name: str


@dataclass(frozen=True)
class AdapterPage:
    adapters: list[OwnedAdapter]
    next_page_token: str


def check_name(name: str) -> None:
    if not ADAPTER_NAME.fullmatch(name):
        raise InvalidArgument(ADAPTER_NAME_RULE, field="name")


def check_requested_name(name: str, field: str = "adapter") -> None:
    """A name a request uses (an adapter's or a saved mix's): INVALID_ARGUMENT on `field` unless it could
    be one, before any query (Postgres refuses a NUL with an error that names no field)."""
    if not name:
        raise InvalidArgument("required", field=field)
    if not ADAPTER_NAME.fullmatch(name):
        raise InvalidArgument(ADAPTER_NAME_RULE, field=field)


def _owned(session: Session, adapter: Adapter) -> OwnedAdapter:
    return OwnedAdapter(adapter, session.get(Tenant, adapter.tenant_id).name)


def resolve_visible(session: Session, tenant_id: uuid.UUID, name: str) -> Adapter:
    """The tenant's own adapter of that name, else the public adapter of the tenant that published one under
    that name first (`public_claimant`); NOT_FOUND (the same answer as for a name that never existed)
    otherwise. A name the tenant's own adapter had stays its own after a delete: NOT_FOUND until it uploads
    one again, never another tenant's public adapter of that name; and a public name stays its first
    publisher's after it deletes its adapter or makes it private: NOT_FOUND, never another tenant's adapter
    of that name (calls went on, silently, to a stranger's weights at the stranger's royalty)."""
    check_requested_name(name)
    own = session.scalar(select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name))
    if own is not None:
        if own.status != STATUS_READY:
            raise AdapterNotFound(name)
        return own
    claimant = public_claimant(session, name)
    public = (
        None
        if claimant is None
        else session.scalar(
            select(Adapter).where(
                Adapter.tenant_id == claimant,
                Adapter.name == name,
                Adapter.status == STATUS_READY,
                Adapter.visibility == VISIBILITY_PUBLIC,
            )
        )
    )
    if public is None:
        raise AdapterNotFound(name)
    return public


def public_claimant(session: Session, name: str) -> uuid.UUID | None:
    """The tenant that first published an adapter under `name` (whatever that adapter is now); None when
    no adapter of that name was ever public."""
    return session.scalar(
        select(Adapter.tenant_id)
        .where(Adapter.name == name, Adapter.published_at.is_not(None))
        .order_by(Adapter.published_at, Adapter.id)
        .limit(1)
    )


def check_public_name_free(session: Session, tenant_id: uuid.UUID, name: str, visibility: str) -> None:
    """A public upload under a name another tenant published first is refused (ALREADY_EXISTS): that name
    reaches the first publisher's adapter, for every other tenant, for good. Call under
    `lock_public_name` when the row is written in the same transaction."""
    if visibility != VISIBILITY_PUBLIC:
        return
    claimant = public_claimant(session, name)
    if claimant is not None and claimant != tenant_id:
        raise AlreadyExists(
            f"another tenant published an adapter named {name!r} first; other tenants' calls of the name "
            "reach that one: publish yours under another name, or upload it as private",
            field="name",
        )


def lock_public_name(session: Session, name: str) -> None:
    """Serializes, until the transaction ends, the transactions that check then claim a public name."""
    session.execute(select(func.pg_advisory_xact_lock(func.hashtextextended(f"public-name:{name}", 0))))


def get_adapter(session: Session, tenant: Tenant, name: str) -> OwnedAdapter:
    check_requested_name(name, "name")  # GetAdapterRequest's field (Authorize's is `adapter`)
    return _owned(session, resolve_visible(session, tenant.id, name))


def list_adapters(
    session: Session, tenant: Tenant, page_size: int, page_token: str, include_public: bool
) -> AdapterPage:
    """READY adapters of the tenant (and public ones of others), by name then id, keyset paged."""
    if page_size == 0:
        page_size = DEFAULT_PAGE_SIZE
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise InvalidArgument(f"must be 1..{MAX_PAGE_SIZE}", field="page_size")
    visible = Adapter.tenant_id == tenant.id
    if include_public:
        visible = or_(visible, Adapter.visibility == VISIBILITY_PUBLIC)
    query = select(Adapter).where(Adapter.status == STATUS_READY, visible)
    if page_token:
        name, adapter_id = decode_page_token(page_token, ADAPTER_NAME)
        query = query.where(or_(Adapter.name > name, and_(Adapter.name == name, Adapter.id > adapter_id)))
    rows = list(session.scalars(query.order_by(Adapter.name, Adapter.id).limit(page_size + 1)))
    next_token = (
        encode_page_token(rows[page_size - 1].name, rows[page_size - 1].id) if len(rows) > page_size else ""
    )
    tenant_names = {
        t.id: t.name
        for t in session.scalars(select(Tenant).where(Tenant.id.in_({r.tenant_id for r in rows})))
    }
    return AdapterPage([OwnedAdapter(r, tenant_names[r.tenant_id]) for r in rows[:page_size]], next_token)


def delete_adapter(session: Session, tenant: Tenant, name: str) -> OwnedAdapter:
    """Marks the tenant's own adapter DELETED; another tenant's (even public) is NOT_FOUND."""
    check_name(name)
    adapter = session.scalar(
        select(Adapter)
        .where(Adapter.tenant_id == tenant.id, Adapter.name == name, Adapter.status == STATUS_READY)
        .with_for_update()
    )
    if adapter is None:
        raise AdapterNotFound(name)
    now = utc_now()
    adapter.status = STATUS_DELETED
    adapter.deleted_at = adapter.updated_at = now
    return OwnedAdapter(adapter, tenant.name)


@dataclass(frozen=True)
class AdapterRecord:
    """What the registry row of an upload says beyond the validated content."""

    name: str
    visibility: str
    royalty_micros_per_million_tokens: int
    keep_warm: bool
    description: str


def lock_name(session: Session, tenant_id, name: str) -> None:
    """Serializes, until the transaction ends, every transaction that checks then takes this tenant's name
    (an adapter upload's row, a CreateMix): adapters and mixes share one namespace, and two such
    transactions could each see the name free and both take it."""
    lock_until_commit(session, f"name:{tenant_id}:{name}")


def lock_served_content(session: Session, tenant_id, name: str) -> None:
    """Serializes, until the transaction ends, the transactions that change which content the tenant's
    adapter of that name serves (an upload of the name, its delete). Taken before any artifact's lock: the
    content such a transaction then reads stays until it commits, so it locks that content in one sorted
    order with the content it brings (a lock taken later, for content another upload of the name had put
    there meanwhile, deadlocked against an upload locking both contents in order)."""
    lock_until_commit(session, f"served-content:{tenant_id}:{name}")


@dataclass(frozen=True)
class NamedTerms:
    """The terms of a tenant's adapter row of some name before an upload of that name."""

    ready: bool  # False: deleted (its row, id and past usage come back with the upload)
    visibility: str
    royalty: int
    keep_warm: bool


def named_terms(session: Session, tenant_id, name: str) -> NamedTerms | None:
    """The terms of the tenant's adapter row of that name, READY or deleted; None when the name never held
    an adapter. The row stays locked until the transaction ends (an upload that reads it then writes it)."""
    row = session.execute(
        select(
            Adapter.status, Adapter.visibility, Adapter.royalty_micros_per_million_tokens, Adapter.keep_warm
        )
        .where(Adapter.tenant_id == tenant_id, Adapter.name == name)
        .with_for_update()
    ).first()
    return None if row is None else NamedTerms(row[0] == STATUS_READY, row[1], row[2], row[3])


def record_upload(
    session: Session,
    tenant: Tenant,
    base_model: BaseModelRow,
    record: AdapterRecord,
    info: AdapterInfo,
    sha256: str,
) -> tuple[OwnedAdapter, str | None]:
    """Writes the READY row for a published artifact: a new row, or the existing row of that name
    replaced in place (same id). Returns it and the sha256 it replaced (None when new or unchanged)."""
    adapter = session.scalar(
        select(Adapter).where(Adapter.tenant_id == tenant.id, Adapter.name == record.name).with_for_update()
    )
    now = utc_now()
    replaced: str | None = None
    if adapter is None:
        adapter = Adapter(tenant_id=tenant.id, name=record.name, created_at=now)
        session.add(adapter)
    elif adapter.status == STATUS_READY and adapter.sha256 != sha256:
        replaced = adapter.sha256
    adapter.visibility = record.visibility or VISIBILITY_PRIVATE
    if adapter.visibility == VISIBILITY_PUBLIC and adapter.published_at is None:
        adapter.published_at = now
    adapter.base_model_name = base_model.name
    adapter.base_model_fingerprint = base_model.fingerprint
    adapter.rank = info.rank
    adapter.alpha = info.alpha
    adapter.use_rslora = info.use_rslora
    adapter.target_modules = list(info.target_modules)
    adapter.sha256 = sha256
    adapter.size_bytes = info.size_bytes
    adapter.status = STATUS_READY
    adapter.royalty_micros_per_million_tokens = record.royalty_micros_per_million_tokens
    adapter.keep_warm = record.keep_warm
    adapter.description = record.description
    adapter.updated_at = now
    adapter.deleted_at = None
    try:
        session.flush()
    except IntegrityError:
        raise AlreadyExists(f"adapter {record.name!r} is being uploaded concurrently", field="name") from None
    return OwnedAdapter(adapter, tenant.name), replaced


def is_referenced(session: Session, sha256: str) -> bool:
    return session.scalar(select(Adapter.id).where(Adapter.sha256 == sha256).limit(1)) is not None


def tenant_holds(session: Session, tenant_id, sha256: str) -> bool:
    """Whether one of this tenant's own adapters already uses this artifact (what an upload may report as
    deduplicated: that another tenant stores the same bytes is not the uploader's to learn)."""
    return (
        session.scalar(
            select(Adapter.id).where(Adapter.sha256 == sha256, Adapter.tenant_id == tenant_id).limit(1)
        )
        is not None
    )


@dataclass(frozen=True)
class AdapterKey:
    """The worker cache key an adapter is served under (openlora/cache_scope.py), with its row's id."""

    adapter_id: uuid.UUID
    tenant_id: uuid.UUID
    sha256: str
    public: bool

    @property
    def scope(self) -> str:
        return cache_scope(self.tenant_id, private=not self.public)


def ready_key(session: Session, tenant_id: uuid.UUID, name: str) -> AdapterKey | None:
    """The cache key of the tenant's READY adapter of that name (None when it has none)."""
    row = session.execute(
        select(Adapter.id, Adapter.sha256, Adapter.visibility).where(
            Adapter.tenant_id == tenant_id, Adapter.name == name, Adapter.status == STATUS_READY
        )
    ).first()
    return None if row is None else AdapterKey(row[0], tenant_id, row[1], row[2] == VISIBILITY_PUBLIC)


def key_of(adapter: Adapter) -> AdapterKey:
    return AdapterKey(adapter.id, adapter.tenant_id, adapter.sha256, adapter.visibility == VISIBILITY_PUBLIC)


def key_is_served(session: Session, key: AdapterKey) -> bool:
    """Whether a READY adapter other than `key.adapter_id` is served under the same worker cache key: for a
    private adapter, another private adapter of its owner with the same content; for a public one, another
    public adapter with the same content."""
    same_key = [
        Adapter.sha256 == key.sha256,
        Adapter.status == STATUS_READY,
        Adapter.id != key.adapter_id,
    ]
    if key.public:
        same_key.append(Adapter.visibility == VISIBILITY_PUBLIC)
    else:
        same_key += [Adapter.tenant_id == key.tenant_id, Adapter.visibility != VISIBILITY_PUBLIC]
    return session.scalar(select(Adapter.id).where(*same_key).limit(1)) is not None


def is_served(session: Session, sha256: str) -> bool:
    """Whether a READY adapter (of any tenant) still uses this artifact: then its content must stay on
    workers, and an invalidation names only the adapter id."""
    return (
        session.scalar(
            select(Adapter.id).where(Adapter.sha256 == sha256, Adapter.status == STATUS_READY).limit(1)
        )
        is not None
    )


def artifact_referenced(session: Session, sha256: str) -> bool:
    """Whether an adapter of the registry (not deleted) points at content `sha256`."""
    return (
        session.scalar(
            select(Adapter.id).where(Adapter.sha256 == sha256, Adapter.deleted_at.is_(None)).limit(1)
        )
        is not None
    )
