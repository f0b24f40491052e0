"""Protobuf <-> domain conversions of named mixes (AdminService's Mix, WorkerService's ResolvedMix)."""

from __future__ import annotations

from control_plane.errors import InvalidArgument
from control_plane.mixes.models import DENSITY_METHODS, ELECTING_METHODS, Mix
from control_plane.mixes.service import MixSpec, OwnedMix, ResolvedMix
from control_plane.registry.models import Adapter
from control_plane.server.convert import resolved_adapter_to_proto, timestamp
from openlora.v1 import admin_pb2, inference_pb2, worker_pb2

_METHODS = {
    inference_pb2.MIX_METHOD_LINEAR: "linear",
    inference_pb2.MIX_METHOD_TIES: "ties",
    inference_pb2.MIX_METHOD_DARE_LINEAR: "dare_linear",
    inference_pb2.MIX_METHOD_DARE_TIES: "dare_ties",
    inference_pb2.MIX_METHOD_MAGNITUDE_PRUNE: "magnitude_prune",
    inference_pb2.MIX_METHOD_ENSEMBLE: "ensemble",
}
_SIGN_METHODS = {
    inference_pb2.MAJORITY_SIGN_METHOD_TOTAL: "total",
    inference_pb2.MAJORITY_SIGN_METHOD_FREQUENCY: "frequency",
}
_COMBINES = {
    inference_pb2.ENSEMBLE_COMBINE_PROBS: "probs",
    inference_pb2.ENSEMBLE_COMBINE_LOGPROBS: "logprobs",
}
_METHODS_TO_PROTO = {v: k for k, v in _METHODS.items()}
_SIGN_METHODS_TO_PROTO = {v: k for k, v in _SIGN_METHODS.items()}
_COMBINES_TO_PROTO = {v: k for k, v in _COMBINES.items()}


def _enum(table: dict[int, str], value: int, unspecified: str | None, field: str) -> str | None:
    if value == 0:
        return unspecified
    if value not in table:
        raise InvalidArgument(f"is unknown ({value}); one of {', '.join(table.values())}", field=field)
    return table[value]


def _options(mix: Mix) -> dict:
    """The options that apply to the mix's method (as a request for it would carry them), others unset."""
    options: dict = {}
    if mix.method in DENSITY_METHODS:
        options["density"] = mix.density
    if mix.method in ELECTING_METHODS:
        options["majority_sign_method"] = _SIGN_METHODS_TO_PROTO[mix.majority_sign_method]
    if mix.method == "ensemble":
        options["combine"] = _COMBINES_TO_PROTO[mix.combine]
    return options


def mix_spec_from_proto(request: admin_pb2.CreateMixRequest) -> MixSpec:
    return MixSpec(
        name=request.name,
        members=tuple((m.adapter, float(m.weight)) for m in request.members),
        method=_enum(_METHODS, request.method, "linear", "method") or "linear",
        density=float(request.density) if request.HasField("density") else None,
        majority_sign_method=_enum(_SIGN_METHODS, request.majority_sign_method, None, "majority_sign_method"),
        combine=_enum(_COMBINES, request.combine, None, "combine"),
        description=request.description,
    )


def mix_to_proto(owned: OwnedMix) -> admin_pb2.Mix:
    mix = owned.mix
    return admin_pb2.Mix(
        id=str(mix.id),
        name=mix.name,
        tenant=owned.tenant_name,
        members=[
            inference_pb2.AdapterWeight(adapter=name, weight=member.weight)
            for name, member in zip(owned.member_names, mix.members, strict=True)
        ],
        method=_METHODS_TO_PROTO[mix.method],
        description=mix.description,
        **_options(mix),
        created_at=timestamp(mix.created_at),
    )


def resolved_to_proto(name: str, resolved: Adapter | ResolvedMix) -> worker_pb2.ResolvedAdapter:
    """One answer of Authorize, for the name asked: an adapter's, or a saved mix's with its members."""
    if isinstance(resolved, Adapter):
        return resolved_adapter_to_proto(resolved)
    mix = resolved.mix
    return worker_pb2.ResolvedAdapter(
        name=name,
        adapter_id=str(mix.id),
        mix=worker_pb2.ResolvedMix(
            members=[
                worker_pb2.ResolvedMixMember(
                    adapter=resolved_adapter_to_proto(a) if a is not None else None, weight=weight
                )
                for a, weight in resolved.members
            ],
            method=_METHODS_TO_PROTO[mix.method],
            **_options(mix),
        ),
    )
