"""A Generate naming a saved mix (`adapter = NAME`) served as that mix.

Authorize answers a mix name with the mix's members, method and options (`ResolvedAdapter.mix`). The
request is then the one the mix stands for: its members as `mix`, its method and options as the request's,
checked by the same `check_request` as a request that spells them out, so a saved mix is served, refused
and billed exactly like that request. The caller's own prompt, sampling and request id are kept.
"""

from __future__ import annotations

import dataclasses

from data_plane.engine.errors import AdapterLoadError, InvalidRequest
from data_plane.server.artifact_store import ArtifactRejected
from data_plane.server.control_plane_client import Authorization, ResolvedAdapter, ResolvedMix
from data_plane.server.validation import RequestFieldError, RequestLimits, ValidRequest, check_request
from openlora.v1 import inference_pb2


def expand_named_mix(
    valid: ValidRequest, names: tuple[str, ...], auth: Authorization, limits: RequestLimits
) -> tuple[ValidRequest, dict[str, ResolvedAdapter]]:
    """(the request to serve, its adapters by name). `names` are the names authorised, parallel to
    `auth.adapters`. A request naming one saved mix (`adapter`) becomes that mix; a saved mix inside a
    request's own `mix`, one member or more, is refused (INVALID_ARGUMENT naming the member): its weight,
    method and options would otherwise be dropped for the saved mix's own."""
    by_name = dict(zip(names, auth.adapters, strict=True))
    mixes = {name for name, resolved in by_name.items() if resolved.mix is not None}
    if not mixes:
        return valid, by_name
    if valid.from_mix or valid.adapters[0][0] not in mixes:
        index = next(i for i, (name, _) in enumerate(valid.adapters) if name in mixes)
        raise RequestFieldError(
            f"mix[{index}].adapter", "names a saved mix; the members of a mix must be adapters"
        )
    name = valid.adapters[0][0]
    mix = by_name[name].mix
    try:
        spelled = check_request(_mix_request(mix), limits)
    except RequestFieldError as error:  # a saved mix the worker cannot serve as saved (its limits)
        raise RequestFieldError("adapter", f"names the mix {name!r}: {error}") from None
    expanded = dataclasses.replace(
        valid,
        adapters=spelled.adapters,
        mix_method=spelled.mix_method,
        density=spelled.density,
        majority_sign_method=spelled.majority_sign_method,
        combine=spelled.combine,
    )
    return expanded, {m.name: m for m, _ in mix.members if m is not None}


# The refusals that name a field of the request (`field`, `reason`), each rebuilt as its own kind (the
# status it maps to) by `named_mix_error`.
_FIELD_ERRORS = (RequestFieldError, InvalidRequest, AdapterLoadError, ArtifactRejected)


def named_mix_error(error: Exception, name: str) -> Exception | None:
    """A refusal of the mix the saved mix `name` stands for (its ranks past this worker's limit, a member
    now holding another member's content, a member this worker refuses), which names the `mix` fields of
    that request, as the caller's request names it: `adapter`, with the mix and the member in the reason
    (the caller sent no `mix`). None for any other error, or one naming another field."""
    field = getattr(error, "field", "")
    if not isinstance(error, _FIELD_ERRORS) or not (field == "mix" or field.startswith(("mix[", "mix."))):
        return None
    kind = next(kind for kind in _FIELD_ERRORS if isinstance(error, kind))
    return kind("adapter", f"names the mix {name!r}: {error}")


def _mix_request(mix: ResolvedMix) -> inference_pb2.GenerateRequest:
    """The request the mix stands for (with a placeholder prompt: only the mix fields are read)."""
    request = inference_pb2.GenerateRequest(
        prompt_token_ids=[0],
        mix=[
            inference_pb2.AdapterWeight(adapter=m.name if m is not None else "", weight=weight)
            for m, weight in mix.members
        ],
        mix_method=mix.method,
        majority_sign_method=mix.majority_sign_method,
        combine=mix.combine,
    )
    if mix.density is not None:
        request.density = mix.density
    return request
