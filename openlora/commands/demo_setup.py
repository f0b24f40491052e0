"""What `openlora up` puts into a system it starts: the demo model (trained once into the state dir), the
demo tenant with its key and adapters, the demo model's price and the saved mixes of the README's quick
start; and the UploadAdapter request stream of a PEFT directory that pushes them (tests use it too).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import grpc

from openlora.artifact import ARTIFACT_FILES
from openlora.v1 import admin_pb2, admin_pb2_grpc, inference_pb2

log = logging.getLogger("openlora.up")

_CHUNK_BYTES = 1 << 20
# The price `up` sets for its own demo model, so that invoices show amounts (micro-units per M tokens).
DEMO_PROMPT_MICROS_PER_MILLION_TOKENS = 100_000
DEMO_COMPLETION_MICROS_PER_MILLION_TOKENS = 200_000
# The saved mixes `up` creates for its demo tenant on its own demo model (the README's quick start):
# name -> CreateMixRequest fields.
DEMO_MIXES = {
    "counter": {
        "members": (("count", 1.0), ("uppercase", 1.0)),
        "method": inference_pb2.MIX_METHOD_TIES,
        "density": 0.5,
    },
}


def ensure_demo_model(state_dir: Path) -> Path:
    out = state_dir / "demo-model"
    done = out / ".complete"
    if done.exists():
        return out
    from data_plane.demo import write_demo_model

    if out.exists():
        import shutil

        shutil.rmtree(out)
    print(
        "writing the demo model (once: it is trained here, 40-80 s on 2 CPU cores)...",
        file=sys.stderr,
        flush=True,
    )
    write_demo_model(out)
    done.write_text("ok\n")
    return out


def _key_acts_for(stub: admin_pb2_grpc.AdminServiceStub, key: str, tenant: str) -> bool:
    """Whether `key` still authenticates as an admin of `tenant` (False once revoked or unknown, as after
    a new database)."""
    try:
        stub.ListAdapters(
            admin_pb2.ListAdaptersRequest(tenant=tenant, page_size=1),
            metadata=(("authorization", f"Bearer {key}"),),
            timeout=30,
        )
    except grpc.RpcError as error:
        if error.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return False
        raise
    return True


def ensure_tenant(
    admin_target: str, admin_key: str, tenant: str, kept_key: str | None = None
) -> tuple[str, bool]:
    """Creates the tenant unless it exists; returns an admin+infer key for it (`kept_key` while it still
    acts for the tenant, else a new one) and whether this call created the tenant."""
    metadata = (("authorization", f"Bearer {admin_key}"),)
    with grpc.insecure_channel(admin_target) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        created = True
        try:
            stub.CreateTenant(admin_pb2.CreateTenantRequest(name=tenant), metadata=metadata, timeout=30)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
            created = False
        if kept_key and _key_acts_for(stub, kept_key, tenant):
            return kept_key, created
        key = stub.CreateApiKey(
            admin_pb2.CreateApiKeyRequest(
                tenant=tenant, scopes=[admin_pb2.SCOPE_INFER, admin_pb2.SCOPE_ADMIN]
            ),
            metadata=metadata,
            timeout=30,
        ).secret
    return key, created


def push_adapters(
    admin_target: str, admin_key: str, tenant: str, adapters_dir: Path, base_model: str
) -> list[str]:
    """Pushes every adapter directory under `adapters_dir` for `tenant`, named after its directory;
    returns the names."""
    metadata = (("authorization", f"Bearer {admin_key}"),)
    names = []
    if adapters_dir.is_dir():
        with grpc.insecure_channel(admin_target) as channel:
            stub = admin_pb2_grpc.AdminServiceStub(channel)
            for path in sorted(p for p in adapters_dir.iterdir() if p.is_dir()):
                stub.UploadAdapter(upload_messages(path, tenant, base_model), metadata=metadata, timeout=120)
                names.append(path.name)
    return names


def own_adapter_names(admin_target: str, key: str, tenant: str, base_model: str) -> list[str]:
    """The names of `tenant`'s own adapters of `base_model` as they are now (first page: what a ready line
    can show): a state dir that served another model before keeps that model's adapters, which this one
    refuses."""
    with grpc.insecure_channel(admin_target) as channel:
        response = admin_pb2_grpc.AdminServiceStub(channel).ListAdapters(
            admin_pb2.ListAdaptersRequest(tenant=tenant, page_size=100),
            metadata=(("authorization", f"Bearer {key}"),),
            timeout=30,
        )
    return sorted(a.name for a in response.adapters if a.base_model == base_model)


def set_demo_price(admin_target: str, admin_key: str, base_model: str) -> None:
    """Prices the demo base model as the operator; a failure only costs the amounts on invoices."""
    metadata = (("authorization", f"Bearer {admin_key}"),)
    try:
        with grpc.insecure_channel(admin_target) as channel:
            admin_pb2_grpc.AdminServiceStub(channel).SetPrice(
                admin_pb2.SetPriceRequest(
                    base_model=base_model,
                    prompt_micros_per_million_tokens=DEMO_PROMPT_MICROS_PER_MILLION_TOKENS,
                    completion_micros_per_million_tokens=DEMO_COMPLETION_MICROS_PER_MILLION_TOKENS,
                ),
                metadata=metadata,
                timeout=30,
            )
    except grpc.RpcError as error:
        log.warning("could not set the demo price of %s: %s", base_model, error)


def create_demo_mixes(admin_target: str, admin_key: str, tenant: str) -> None:
    """Saves the demo mixes for the demo tenant (kept when they exist); a failure only costs the demo."""
    metadata = (("authorization", f"Bearer {admin_key}"),)
    with grpc.insecure_channel(admin_target) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        for name, fields in DEMO_MIXES.items():
            request = admin_pb2.CreateMixRequest(
                name=name,
                tenant=tenant,
                members=[inference_pb2.AdapterWeight(adapter=a, weight=w) for a, w in fields["members"]],
                method=fields["method"],
                density=fields.get("density"),
            )
            try:
                stub.CreateMix(request, metadata=metadata, timeout=30)
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.ALREADY_EXISTS:
                    log.warning("could not save the demo mix %s: %s", name, error.details())


def upload_messages(
    path: Path,
    tenant: str,
    base_model: str,
    *,
    name: str | None = None,
    visibility: int = admin_pb2.VISIBILITY_PRIVATE,
):
    """UploadAdapter's client stream for a PEFT directory: the header with a manifest, then the chunks."""
    files = [(filename, (path / filename).read_bytes()) for filename in ARTIFACT_FILES]
    yield admin_pb2.UploadAdapterRequest(
        header=admin_pb2.UploadAdapterHeader(
            name=name or path.name,
            visibility=visibility,
            base_model=base_model,
            tenant=tenant,
            files=[admin_pb2.FileManifest(filename=f, size_bytes=len(data)) for f, data in files],
        )
    )
    for filename, data in files:
        for offset in range(0, max(len(data), 1), _CHUNK_BYTES):
            chunk = admin_pb2.FileChunk(
                filename=filename, offset=offset, data=data[offset : offset + _CHUNK_BYTES]
            )
            yield admin_pb2.UploadAdapterRequest(chunk=chunk)
