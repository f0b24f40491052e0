"""Named-mix operations inside one transaction: create (members resolved and checked as the tenant sees
them), list, delete, resolution for a Generate, and the mixes a source adapter feeds."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from control_plane.errors import AdapterNotFound, FailedPrecondition, InvalidArgument
from control_plane.mixes.errors import MixNotFound, NameTaken
from control_plane.mixes.models import (
    COMBINES,
    DENSITY_METHODS,
    ELECTING_METHODS,
    METHODS,
    SIGN_METHODS,
    Mix,
    MixMember,
)
from control_plane.registry import service as registry
from control_plane.registry.models import STATUS_READY, Adapter
from control_plane.tenancy.models import Tenant
from control_plane.text import check_text
from control_plane.workers import service as workers
from openlora.mix_rules import density_problem, weight_problem
from openlora.names import ADAPTER_NAME_RULE
from openlora.text_rules import prose_problem

MAX_MIX_MEMBERS = 8
MAX_DESCRIPTION_CHARS = 4096


@dataclass(frozen=True)
class MixSpec:
    """A mix as a caller asks for it; `method` etc. are the stored names (see mixes.models). An option
    left None takes its default; one given for a method it does not apply to is refused."""

    name: str
    members: tuple[tuple[str, float], ...]  # (adapter name, "" = the base model; weight)
    method: str = "linear"
    density: float | None = None
    majority_sign_method: str | None = None
    combine: str | None = None
    description: str = ""


@dataclass(frozen=True)
class OwnedMix:
    mix: Mix
    tenant_name: str
    # Parallel to mix.members: each member's adapter name ("" for the base model).
    member_names: tuple[str, ...]


@dataclass(frozen=True)
class ResolvedMix:
    """A mix as a Generate serves it: each member's adapter as the caller sees it now (None: the base)."""

    mix: Mix
    members: tuple[tuple[Adapter | None, float], ...]


def check_spec(spec: MixSpec) -> None:
    """Field checks that need no database; InvalidArgument naming the field."""
    registry.check_name(spec.name)
    if spec.method not in METHODS:
        raise InvalidArgument(f"must be one of {', '.join(METHODS)}", field="method")
    if spec.density is not None:
        if spec.method not in DENSITY_METHODS:
            raise InvalidArgument(f"applies only to {', '.join(DENSITY_METHODS)}", field="density")
        problem = density_problem(spec.density)
        if problem is not None:
            raise InvalidArgument(problem, field="density")
    if spec.majority_sign_method is not None:
        if spec.method not in ELECTING_METHODS:
            raise InvalidArgument(
                f"applies only to {', '.join(ELECTING_METHODS)}", field="majority_sign_method"
            )
        if spec.majority_sign_method not in SIGN_METHODS:
            raise InvalidArgument(f"must be one of {', '.join(SIGN_METHODS)}", field="majority_sign_method")
    if spec.combine is not None:
        if spec.method != "ensemble":
            raise InvalidArgument("applies only to ensemble", field="combine")
        if spec.combine not in COMBINES:
            raise InvalidArgument(f"must be one of {', '.join(COMBINES)}", field="combine")
    if not 1 <= len(spec.members) <= MAX_MIX_MEMBERS:
        raise InvalidArgument(f"must hold 1..{MAX_MIX_MEMBERS} adapters", field="members")
    seen: set[str] = set()
    for i, (name, weight) in enumerate(spec.members):
        if name or spec.method != "ensemble":
            if not name:
                raise InvalidArgument(
                    "must not be empty (only an ensemble has the base model)", f"members[{i}].adapter"
                )
            if not registry.ADAPTER_NAME.fullmatch(name):
                raise InvalidArgument(ADAPTER_NAME_RULE, f"members[{i}].adapter")
        if name in seen:
            raise InvalidArgument(f"{name!r} appears twice", field=f"members[{i}].adapter")
        seen.add(name)
        problem = weight_problem(weight, spec.method)
        if problem is not None:
            raise InvalidArgument(problem, field=f"members[{i}].weight")
    if all(weight == 0 for _, weight in spec.members):
        raise InvalidArgument("weights must not all be zero", field="members")
    check_text(spec.description, "description", MAX_DESCRIPTION_CHARS, rule=prose_problem)


def create_mix(
    session: Session, tenant: Tenant, spec: MixSpec, max_rank_of: Callable[[str], int] | None = None
) -> OwnedMix:
    """Saves the mix; NOT_FOUND for a member the tenant may not use, ALREADY_EXISTS for a taken name.
    `max_rank_of`: a base model's name -> the largest LoRA rank its workers serve; a linear mix, served as
    one adapter of its members' ranks added up, is refused past it (every call to it would be)."""
    check_spec(spec)
    registry.lock_name(session, tenant.id, spec.name)  # an upload of that name may be completing now
    workers.check_not_a_base_model_name(session, spec.name, "name")
    if _own_adapter(session, tenant.id, spec.name) is not None:
        raise NameTaken(spec.name, "an adapter")
    if find_mix(session, tenant.id, spec.name) is not None:
        raise NameTaken(spec.name, "a mix")
    for i, (name, _) in enumerate(spec.members):
        # As Authorize resolves it for a Generate: the tenant's own mix of that name before anyone's
        # public adapter (bound to the adapter, the saved mix served another owner's weights).
        if name and find_mix(session, tenant.id, name) is not None:
            raise InvalidArgument(
                "names a saved mix; the members of a mix must be adapters", field=f"members[{i}].adapter"
            )
    adapters = []
    for i, (name, _) in enumerate(spec.members):
        try:
            adapters.append(registry.resolve_visible(session, tenant.id, name) if name else None)
        except AdapterNotFound as missing:
            raise AdapterNotFound(missing.name, field=f"members[{i}].adapter") from None
    fingerprints = {a.base_model_fingerprint for a in adapters if a is not None}
    if len(fingerprints) > 1:
        raise InvalidArgument("the adapters are for different base models", field="members")
    seen: dict[str, int] = {}
    for i, adapter in enumerate(adapters):
        if adapter is not None:
            first = seen.setdefault(adapter.sha256, i)
            if first != i:  # every Generate of such a mix would refuse it
                raise InvalidArgument(
                    f"has the same content as members[{first}] (one adapter under two names)",
                    field=f"members[{i}].adapter",
                )
    if spec.method == "linear" and max_rank_of is not None:
        total_rank = sum(a.rank for a in adapters if a is not None)
        base_model = next(a.base_model_name for a in adapters if a is not None)
        limit = max_rank_of(base_model)
        if total_rank > limit:
            raise InvalidArgument(
                f"a linear mix is served as one adapter of its members' ranks added up, {total_rank} here, "
                f"above {limit}, the largest rank the workers of {base_model} serve (a merge method, such "
                "as ties, keeps the rank within it)",
                field="members",
            )
    density = spec.density
    if density is None and spec.method in DENSITY_METHODS:
        density = 1.0
    mix = Mix(
        tenant_id=tenant.id,
        name=spec.name,
        method=spec.method,
        density=density,
        majority_sign_method=spec.majority_sign_method or "total",
        combine=spec.combine or "probs",
        description=spec.description,
        members=[
            MixMember(position=i, adapter_id=a.id if a is not None else None, weight=weight)
            for i, (a, (_, weight)) in enumerate(zip(adapters, spec.members, strict=True))
        ],
    )
    session.add(mix)
    try:
        session.flush()
    except IntegrityError:
        raise NameTaken(spec.name, "a mix being created concurrently") from None
    return OwnedMix(mix, tenant.name, tuple(name for name, _ in spec.members))


def find_mix(session: Session, tenant_id: uuid.UUID, name: str) -> Mix | None:
    return session.scalar(select(Mix).where(Mix.tenant_id == tenant_id, Mix.name == name))


def list_mixes(session: Session, tenant: Tenant) -> list[OwnedMix]:
    mixes = list(session.scalars(select(Mix).where(Mix.tenant_id == tenant.id).order_by(Mix.name)))
    return [_owned(session, tenant.name, m) for m in mixes]


def delete_mix(session: Session, tenant: Tenant, name: str) -> OwnedMix:
    registry.check_name(name)
    # Locked: of concurrent deletes of one mix, the later ones wait, then find it gone (NOT_FOUND); unlocked,
    # each deleted the row again (0 rows, a warning) and answered OK with the mix as if it had deleted it.
    mix = session.scalar(select(Mix).where(Mix.tenant_id == tenant.id, Mix.name == name).with_for_update())
    if mix is None:
        raise MixNotFound(name)
    owned = _owned(session, tenant.name, mix)
    session.delete(mix)
    session.flush()
    return owned


def resolve_mix(session: Session, tenant_id: uuid.UUID, mix: Mix, fingerprint: str | None) -> ResolvedMix:
    """Each member as the tenant sees its name now (`registry.resolve_visible`): the tenant's own adapter
    of that name once it has one, even where the mix was saved over another tenant's public adapter of
    that name; a member deleted or no longer visible to the tenant is NOT_FOUND (named, the tenant chose
    it), one for another base model FAILED_PRECONDITION."""
    members = []
    for member in mix.members:
        if member.adapter_id is None:
            members.append((None, member.weight))
            continue
        adapter = registry.resolve_visible(session, tenant_id, session.get(Adapter, member.adapter_id).name)
        if fingerprint is not None and adapter.base_model_fingerprint != fingerprint:
            raise FailedPrecondition(
                f"mix {mix.name!r}: adapter {adapter.name!r} was made for base model "
                f"{adapter.base_model_name!r}",
                field="adapter",
            )
        members.append((adapter, member.weight))
    return ResolvedMix(mix, tuple(members))


def mix_ids_using(session: Session, adapter_id: uuid.UUID) -> list[uuid.UUID]:
    """The mixes (of any tenant) with this adapter as a member."""
    return list(
        session.scalars(select(MixMember.mix_id).where(MixMember.adapter_id == adapter_id).distinct())
    )


def _own_adapter(session: Session, tenant_id: uuid.UUID, name: str) -> Adapter | None:
    return session.scalar(
        select(Adapter).where(
            Adapter.tenant_id == tenant_id, Adapter.name == name, Adapter.status == STATUS_READY
        )
    )


def _owned(session: Session, tenant_name: str, mix: Mix) -> OwnedMix:
    names = []
    for member in mix.members:
        adapter = session.get(Adapter, member.adapter_id) if member.adapter_id is not None else None
        names.append(adapter.name if adapter is not None else "")
    return OwnedMix(mix, tenant_name, tuple(names))


def check_adapter_name_free(session: Session, tenant_id: uuid.UUID, name: str) -> None:
    """ALREADY_EXISTS when the tenant has a mix of that name (an adapter upload may not shadow it)."""
    if find_mix(session, tenant_id, name) is not None:
        raise NameTaken(name, "a mix")
