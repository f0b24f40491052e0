"""A checked request's ensemble for the engine, and the adapters its usage is billed to.

An ensemble of K members runs every token K times (one sequence per member), so its usage record carries
its prompt and completion tokens times K (`_Progress.billed_per_token` in generation.py). The royalties
follow the existing split rule: the tokens are split over the adapter members in proportion to their
weights' magnitudes. The base model as a member and members of weight 0 earn no royalty, so they are not
listed; a request whose only weighted member is the base model is billed as the base model.
"""

from __future__ import annotations

from collections.abc import Mapping

from data_plane.engine.request import AdapterRef, Ensemble, EnsembleMember
from data_plane.server.control_plane_client import ResolvedAdapter
from data_plane.server.validation import ValidRequest

# The smallest royalty share the control plane bills (it keeps 6 decimal places of a weight).
MIN_BILLED_SHARE = 5e-7


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
    """(adapter id, billing share) of the adapters a request's tokens are split over.

    A mix may weigh a member negatively (to subtract its task) or by 0, and by any finite magnitude; the
    member's royalty share is its weight's magnitude relative to the largest one, so the control plane
    always receives shares in (0, 1]. A share too small to bill (below the control plane's 6 decimal
    places) earns nothing and is left out, so no record is ever refused for a weight validation accepted.
    """
    members = [(name, abs(weight)) for name, weight in valid.adapters if name]
    largest = max((magnitude for _, magnitude in members), default=0.0)
    if largest == 0.0:
        return ()  # only the base model (an ensemble member) is weighted: billed as the base model
    shares = ((name, magnitude / largest) for name, magnitude in members)
    return tuple((by_name[name].adapter_id, share) for name, share in shares if share >= MIN_BILLED_SHARE)
