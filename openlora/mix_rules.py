"""The rules a mix member's weight must meet, shared by the worker's request validation and the control
plane's CreateMix, so that a saved mix is never one every Generate then refuses."""

from __future__ import annotations

import math

from openlora.setting_rules import number

# A weight scales its adapter's update (linear and merge mixes) or its share of the combined distribution
# (ensembles). Weights past this bound only make float32 overflow (K and V turn infinite); none is needed.
MAX_MIX_WEIGHT = 1000.0
# The merge methods, and every kind a usage record may be billed as (the worker's `request_kind`; "" from a
# worker older than kinds).
MERGE_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
REQUEST_KINDS = frozenset({"", "single", "linear_mix", "ensemble", *(f"merge:{m}" for m in MERGE_METHODS)})


def weight_problem(weight: float, method: str | None) -> str | None:
    """Why `weight` is refused for a member of a mix by `method` ("ensemble", "linear", a merge), or None."""
    if not math.isfinite(weight):
        return f"must be finite, got {weight}"
    if abs(weight) > MAX_MIX_WEIGHT:
        return f"must lie in [-{MAX_MIX_WEIGHT:g}, {MAX_MIX_WEIGHT:g}], got {weight:g}"
    if method == "ensemble" and weight < 0:
        return f"must be >= 0 in an ensemble, got {weight:g}"
    return None


# The smallest density a merge may keep: DARE rescales what it keeps by 1 / density, and a density near
# float32's smallest value turned every kept value infinite.
MIN_DENSITY = 1e-4


def density_problem(density: float) -> str | None:
    """Why `density` (the share of each delta a merge keeps) is refused, or None."""
    # A float32 field carries 1e-4 as 9.99999975e-05: the documented minimum, sent as such, is allowed.
    if not MIN_DENSITY * (1 - 1e-6) <= density <= 1:  # NaN fails too
        return f"must lie in [{MIN_DENSITY:g}, 1], got {density:g}"
    return None


def parse_mix(text: str) -> list[tuple[str, float]]:
    """A mix as the CLI takes it: `a=0.6,b=0.4` -> [("a", 0.6), ("b", 0.4)]; `=0.5` names the base model
    (an ensemble member); a weight is a number as `openlora.setting_rules` reads one (`1_0`, `nan` are
    refused here). Raises ValueError naming the member at fault."""
    members = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, weight = part.partition("=")
        if not sep:
            raise ValueError(f"mix member {part!r} is not NAME=WEIGHT (or =WEIGHT for the base model)")
        try:
            members.append((name.strip(), number(weight.strip(), minimum=None)))
        except ValueError as error:
            raise ValueError(f"mix weight of {name.strip()!r} {error}") from None
    return members
