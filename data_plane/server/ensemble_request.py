"""A checked request's ensemble for the engine, and the adapters its usage is billed to.

An ensemble of K members runs every token K times (one sequence per member), so its usage record carries
its prompt and completion tokens times K (`_Progress.billed_per_token` in generation.py). Its members
sample by weight: an adapter member's share of those K-fold tokens is its weight over the sum of every
member's weight (the base model's included) divided by K, so that its royalty is paid on its weighted
share of the tokens the caller received; the control plane bills the rest as the base model, which earns
no royalty. A linear mix or merge applies every adapter to every token; its shares (each weight's
magnitude over the largest one) only split its tokens in the usage listing. Members of weight 0 earn
nothing and are not listed; a request whose only weighted member is the base model is billed as the
base model.
"""

from __future__ import annotations

from collections.abc import Mapping

from data_plane.engine.request import AdapterRef, Ensemble, EnsembleMember
from data_plane.server.control_plane_client import ResolvedAdapter
from data_plane.server.validation import ValidRequest
from openlora.usage_shares import SHARE_QUANTUM, wire_share


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
    the tokens show).

    An ensemble of K members is billed K times its tokens; an adapter member's share of those is its
    weight over every member's (the base model's included) divided by K, i.e. its weighted share of the
    tokens the caller received, on which its royalty is paid (it was paid on up to K times them: a member
    beside K - 1 of weight 0 earned K royalties a token). The rest, the base member's share and the
    other sequences' work, the control plane bills as the base model."""
    magnitudes = [(name, abs(weight)) for name, weight in valid.adapters]
    adapters = [(name, magnitude) for name, magnitude in magnitudes if name]
    if valid.is_ensemble:
        whole = sum(magnitude for _, magnitude in magnitudes) * len(magnitudes)
    else:
        whole = max((magnitude for _, magnitude in adapters), default=0.0)
    if whole == 0.0:
        return ()  # only the base model (an ensemble member) is weighted: billed as the base model
    shares = [(name, wire_share(magnitude / whole)) for name, magnitude in adapters if magnitude > 0]
    if valid.is_ensemble:
        shares = [(name, share) for name, share in shares if share > 0]
    else:  # every weighted member earns its royalty on every token: listed, however small its weight
        shares = [(name, max(share, SHARE_QUANTUM)) for name, share in shares]
    return tuple((by_name[name].adapter_id, float(share)) for name, share in shares)
