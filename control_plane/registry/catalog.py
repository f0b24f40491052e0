"""The models a tenant may name in a request on one base model: its READY adapters, other tenants'
public ones and its saved mixes, one entry per name (as Authorize resolves the name), keyset paged."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, case, or_, select
from sqlalchemy.dialects.postgresql import distinct_on
from sqlalchemy.orm import Session

from control_plane.errors import AdapterNotFound, FailedPrecondition, InvalidArgument
from control_plane.mixes import service as mixes
from control_plane.mixes.models import Mix
from control_plane.registry.models import STATUS_READY, VISIBILITY_PUBLIC, Adapter
from control_plane.registry.page_token import decode_page_token, encode_page_token
from control_plane.registry.service import ADAPTER_NAME, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from control_plane.tenancy.models import Tenant

KIND_ADAPTER = "adapter"
KIND_MIX = "mix"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    kind: str  # KIND_ADAPTER or KIND_MIX
    owned_by: str  # the owner's tenant name
    created_at: datetime
    entry_id: uuid.UUID  # the adapter's or mix's id (for the page token)


@dataclass(frozen=True)
class ModelPage:
    models: list[ModelEntry]
    next_page_token: str


def list_models(
    session: Session, tenant_id: uuid.UUID, fingerprint: str, page_size: int, page_token: str
) -> ModelPage:
    """Entries by name. A name resolves as Authorize does: the tenant's saved mix, else its own adapter,
    else the oldest public one. A mix is listed when every member is usable on this base model now."""
    if page_size == 0:
        page_size = DEFAULT_PAGE_SIZE
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise InvalidArgument(f"must be 1..{MAX_PAGE_SIZE}", field="page_size")
    after = decode_page_token(page_token, ADAPTER_NAME)[0] if page_token else None
    wanted = page_size + 1
    by_name = {e.name: e for e in _adapters(session, tenant_id, fingerprint, after, wanted)}
    by_name.update((e.name, e) for e in _mixes(session, tenant_id, fingerprint, after, wanted))
    entries = sorted(by_name.values(), key=lambda e: e.name)[:wanted]
    more = len(entries) > page_size
    entries = entries[:page_size]
    next_token = encode_page_token(entries[-1].name, entries[-1].entry_id) if more else ""
    return ModelPage(entries, next_token)


def _adapters(
    session: Session, tenant_id: uuid.UUID, fingerprint: str, after: str | None, limit: int
) -> list[ModelEntry]:
    """The first `limit` names after `after`, each as `registry.resolve_visible` resolves it: the tenant's
    own READY adapter; for a name the tenant never used, the public adapter of the name's first publisher.
    (A name of the tenant's own deleted adapter is not listed: calling it is NOT_FOUND.)"""
    own_names = select(Adapter.name).where(Adapter.tenant_id == tenant_id)
    claims = (
        select(Adapter.name, Adapter.tenant_id)
        .where(Adapter.published_at.is_not(None))
        .ext(distinct_on(Adapter.name))
        .order_by(Adapter.name, Adapter.published_at, Adapter.id)
        .subquery()
    )
    query = (
        select(Adapter, Tenant.name)
        .join(Tenant, Tenant.id == Adapter.tenant_id)
        .join(
            claims, and_(claims.c.name == Adapter.name, claims.c.tenant_id == Adapter.tenant_id), isouter=True
        )
        .where(
            Adapter.status == STATUS_READY,
            Adapter.base_model_fingerprint == fingerprint,
            or_(
                Adapter.tenant_id == tenant_id,
                and_(
                    Adapter.visibility == VISIBILITY_PUBLIC,
                    claims.c.tenant_id.is_not(None),
                    Adapter.name.not_in(own_names),
                ),
            ),
        )
    )
    if after is not None:
        query = query.where(Adapter.name > after)
    own_first = case((Adapter.tenant_id == tenant_id, 0), else_=1)
    query = (
        query.ext(distinct_on(Adapter.name))
        .order_by(Adapter.name, own_first, Adapter.created_at, Adapter.id)
        .limit(limit)
    )
    return [
        ModelEntry(a.name, KIND_ADAPTER, owner, a.created_at, a.id) for a, owner in session.execute(query)
    ]


def _mixes(
    session: Session, tenant_id: uuid.UUID, fingerprint: str, after: str | None, limit: int
) -> list[ModelEntry]:
    """The tenant's first `limit` usable mixes by name after `after`."""
    tenant_name = session.get(Tenant, tenant_id).name
    query = select(Mix).where(Mix.tenant_id == tenant_id)
    if after is not None:
        query = query.where(Mix.name > after)
    entries: list[ModelEntry] = []
    for mix in session.scalars(query.order_by(Mix.name)):
        try:
            mixes.resolve_mix(session, tenant_id, mix, fingerprint)
        except (AdapterNotFound, FailedPrecondition):
            continue
        entries.append(ModelEntry(mix.name, KIND_MIX, tenant_name, mix.created_at, mix.id))
        if len(entries) == limit:
            break
    return entries
