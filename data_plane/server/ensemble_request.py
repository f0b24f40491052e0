"""A checked request's ensemble for the engine, and the adapters its usage is billed to.

An ensemble of K members runs every token K times (one sequence per member), so its usage record carries
its prompt and completion tokens times K (`_Progress.billed_per_token` in generation.py). Its members
sample by weight, so an adapter member's share is its weight over the sum of every member's weight, the
base model's included: the shares then add up to less than 1 and the control plane bills the rest as the
base model, which earns no royalty. A linear mix or merge applies every adapter to every token; its shares
(each weight's magnitude over the largest one) only split its tokens in the usage listing. Members of
weight 0 earn nothing and are not listed; a request whose only weighted member is the base model is
billed as the base model.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal

from data_plane.engine.request import AdapterRef, Ensemble, EnsembleMember
from data_plane.server.control_plane_client import ResolvedAdapter
from data_plane.server.validation import ValidRequest
from openlora.usage_shares import ONE, SHARE_QUANTUM, wire_share


def ensemble_of(valid: ValidRequest, adapter_refs: tuple[AdapterRef, ...]) -> Ensemble | None:
    """The engine's Ensemble of an ensemble request (None for any other request). `adapter_refs` are the
    refs of its adapter members in member order (the base member, named "", has none)."""
    if not valid.is_ensemble:
        return None
    refs = iter(adapter_refs)
    members = tuple(
        EnsembleMember(adapter=next(refs) if name else None, weight=weight) for name, weight in valid.adapters
    )
    return Ensemble(members=members, combine=valid.combine)


def billed_adapters(
    valid: ValidRequest, by_name: Mapping[str, ResolvedAdapter]
) -> tuple[tuple[str, float], ...]:
    """(adapter id, billing share) of the adapters a request's tokens are split over, each share exactly
    what the control plane will bill (`wire_share`), so no record is ever refused for a weight validation
    accepted. A linear mix's or merge's member of a weight too small for 6 decimal places is listed at
    the smallest share (its royalty is on every token); an ensemble's is left out (it samples nothing
    the tokens show). An ensemble's shares add up to exactly 1 when it has no base-model member, and to
    less than 1 when it has one."""
    magnitudes = [(name, abs(weight)) for name, weight in valid.adapters]
    adapters = [(name, magnitude) for name, magnitude in magnitudes if name]
    if valid.is_ensemble:
        whole = sum(magnitude for _, magnitude in magnitudes)  # the base member's weight too
    else:
        whole = max((magnitude for _, magnitude in adapters), default=0.0)
    if whole == 0.0:
        return ()  # only the base model (an ensemble member) is weighted: billed as the base model
    shares = [(name, wire_share(magnitude / whole)) for name, magnitude in adapters if magnitude > 0]
    if valid.is_ensemble:
        shares = [(name, share) for name, share in shares if share > 0]
    else:  # every weighted member earns its royalty on every token: listed, however small its weight
        shares = [(name, max(share, SHARE_QUANTUM)) for name, share in shares]
    has_base_member = any(not name and magnitude > 0 for name, magnitude in magnitudes)
    if valid.is_ensemble and shares and not has_base_member:
        shares = _summing_to_one(shares)
    return tuple((by_name[name].adapter_id, float(share)) for name, share in shares)


def _summing_to_one(shares: list[tuple[str, Decimal]]) -> list[tuple[str, Decimal]]:
    """The rounded shares with their rounding leftover (a few millionths either way) given to the
    largest, so that an ensemble without a base member leaves nothing to bill as the base model."""
    leftover = ONE - sum(share for _, share in shares)
    largest = max(range(len(shares)), key=lambda i: shares[i][1])
    name, share = shares[largest]
    return [*shares[:largest], (name, share + leftover), *shares[largest + 1 :]]
