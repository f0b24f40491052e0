"""A Generate naming a saved mix (`adapter = NAME`) served as that mix.

Authorize answers a mix name with the mix's members, method and options (`ResolvedAdapter.mix`). The
request is then the one the mix stands for: its members as `mix`, its method and options as the request's,
checked by the same `check_request` as a request that spells them out, so a saved mix is served, refused
and billed exactly like that request. The caller's own prompt, sampling and request id are kept.
"""

from __future__ import annotations

import dataclasses

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
