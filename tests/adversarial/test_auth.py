"""Promise: only a well-formed Bearer credential of the right kind and scope gets through."""

from __future__ import annotations

import grpc
import pytest

from openlora.v1 import admin_pb2, inference_pb2, worker_pb2

from .conftest import ADMIN_KEY, BASE_MODEL, WORKER_TOKEN, bearer, status_of

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


def _garbled(key: str) -> dict[str, tuple[tuple[str, str], ...]]:
    return {
        "none": (),
        "scheme only": (("authorization", "Bearer"),),
        "scheme and space": (("authorization", "Bearer "),),
        "basic": (("authorization", f"Basic {key}"),),
        "no scheme": (("authorization", key),),
        "key glued to scheme": (("authorization", f"Bearer{key}"),),
        "truncated key": (("authorization", f"Bearer {key[:-1]}"),),
        "key with suffix": (("authorization", f"Bearer {key}x"),),
        "two tokens": (("authorization", f"Bearer {key} {key}"),),
        "other header": (("x-authorization", f"Bearer {key}"),),
    }


def _well_formed(key: str) -> dict[str, tuple[tuple[str, str], ...]]:
    return {
        "canonical": (("authorization", f"Bearer {key}"),),
        "extra spaces": (("authorization", f"Bearer   {key}  "),),
        "lowercase scheme": (("authorization", f"bearer {key}"),),
    }


def test_garbled_authorization_is_unauthenticated_on_both_servers(attacker):
    tenant = attacker.new_tenant()
    admin_call = lambda m: attacker.admin.ListAdapters(admin_pb2.ListAdaptersRequest(), metadata=m)  # noqa: E731
    infer_call = lambda m: list(  # noqa: E731
        attacker.inference.Generate(inference_pb2.GenerateRequest(prompt="hi"), metadata=m)
    )
    for server, call, key in (
        ("admin", admin_call, tenant.admin_key),
        ("inference", infer_call, tenant.infer_key),
    ):
        codes = {what: status_of(lambda m=m, call=call: call(m)) for what, m in _garbled(key).items()}
        assert codes == dict.fromkeys(codes, UNAUTHENTICATED), server


def test_well_formed_bearer_variants_are_accepted_by_both_servers(attacker):
    tenant = attacker.new_tenant()
    for what, metadata in _well_formed(tenant.admin_key).items():
        attacker.admin.ListAdapters(admin_pb2.ListAdaptersRequest(), metadata=metadata)
        replies = attacker.inference.Generate(
            inference_pb2.GenerateRequest(prompt="hi", sampling={"max_tokens": 1}),
            metadata=metadata,
        )
        assert list(replies)[-1].usage.completion_tokens == 1, what


ADMIN_RPCS = {
    "CreateTenant": admin_pb2.CreateTenantRequest(name="nope"),
    "CreateApiKey": admin_pb2.CreateApiKeyRequest(),
    "RevokeApiKey": admin_pb2.RevokeApiKeyRequest(key_id="x"),
    "GetAdapter": admin_pb2.GetAdapterRequest(name="ad0"),
    "ListAdapters": admin_pb2.ListAdaptersRequest(),
    "DeleteAdapter": admin_pb2.DeleteAdapterRequest(name="ad0"),
    "GetUsage": admin_pb2.GetUsageRequest(),
    "GetInvoice": admin_pb2.GetInvoiceRequest(period="2026-01"),
    "ListWorkers": admin_pb2.ListWorkersRequest(),
    "SetPrice": admin_pb2.SetPriceRequest(base_model=BASE_MODEL),
}


def _admin_codes(attacker, key: str) -> dict[str, grpc.StatusCode]:
    codes = {
        rpc: status_of(lambda rpc=rpc, r=r: getattr(attacker.admin, rpc)(r, metadata=bearer(key)))
        for rpc, r in ADMIN_RPCS.items()
    }
    header = admin_pb2.UploadAdapterRequest(
        header=admin_pb2.UploadAdapterHeader(name="x", base_model=BASE_MODEL)
    )
    codes["UploadAdapter"] = status_of(
        lambda: attacker.admin.UploadAdapter(iter([header]), metadata=bearer(key))
    )
    return codes


def test_infer_only_key_is_permission_denied_on_every_admin_rpc(attacker):
    codes = _admin_codes(attacker, attacker.new_tenant().infer_key)
    assert codes == dict.fromkeys(codes, grpc.StatusCode.PERMISSION_DENIED)


@pytest.mark.parametrize("who", ["worker token", "revoked admin key", "unknown key"])
def test_non_keys_are_unauthenticated_on_every_admin_rpc(attacker, who):
    if who == "worker token":
        key = WORKER_TOKEN
    elif who == "revoked admin key":
        tenant = attacker.new_tenant()
        attacker.admin.RevokeApiKey(
            admin_pb2.RevokeApiKeyRequest(key_id=tenant.admin_key_id), metadata=bearer(ADMIN_KEY)
        )
        key = tenant.admin_key
    else:
        key = "olk_0123456789ab_" + "A" * 43
    codes = _admin_codes(attacker, key)
    assert codes == dict.fromkeys(codes, UNAUTHENTICATED)


def test_api_keys_are_unauthenticated_on_every_worker_rpc(attacker):
    tenant = attacker.new_tenant()
    requests = {
        "RegisterWorker": worker_pb2.RegisterWorkerRequest(address="127.0.0.1:1"),
        "Heartbeat": worker_pb2.HeartbeatRequest(worker_id="fixture"),
        "Authorize": worker_pb2.AuthorizeRequest(api_key=tenant.infer_key),
        "ReportUsage": worker_pb2.ReportUsageRequest(),
        "FetchArtifact": worker_pb2.FetchArtifactRequest(sha256="0" * 64),
    }
    for key in (ADMIN_KEY, tenant.admin_key, tenant.infer_key, ""):
        codes = {
            rpc: status_of(
                lambda rpc=rpc, r=r, key=key: _drain(getattr(attacker.workers, rpc)(r, metadata=bearer(key)))
            )
            for rpc, r in requests.items()
        }
        assert codes == dict.fromkeys(codes, UNAUTHENTICATED), key


def _drain(result):
    return list(result) if hasattr(result, "__next__") else result


def test_two_authorization_entries_are_refused_on_both_servers(attacker):
    """Two entries were read differently: the worker took the first Bearer one (a garbage entry then a
    key: served as that key) and the control plane the first entry (the same call: UNAUTHENTICATED), so
    a proxy in front could check one key while the server served another. Refused on both, as HTTP
    refuses two Authorization headers; one entry is served as before."""
    tenant = attacker.new_tenant()
    other = attacker.new_tenant()
    twice = [
        (("authorization", f"Bearer {tenant.admin_key}"), ("authorization", f"Bearer {other.admin_key}")),
        (("authorization", "garbage"), ("authorization", f"Bearer {tenant.admin_key}")),
        (("authorization", f"Bearer {tenant.admin_key}"), ("authorization", f"Bearer {tenant.admin_key}")),
    ]
    for metadata in twice:
        for call in (
            lambda m=metadata: attacker.admin.ListAdapters(admin_pb2.ListAdaptersRequest(), metadata=m),
            lambda m=metadata: list(
                attacker.inference.Generate(
                    inference_pb2.GenerateRequest(
                        prompt="hi", sampling=inference_pb2.SamplingParams(max_tokens=1)
                    ),
                    metadata=m,
                    timeout=60,
                )
            ),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            details = refused.value.details()  # "authorization: given..." / "authorization given..."
            assert details.startswith("authorization") and "given 2 times" in details
    assert attacker.generate(tenant.infer_key)  # one entry: served
