"""Fixtures of the adversarial tests: the in-process system of tests/worker (real Postgres, Redis,
control plane and a worker on a tiny model with eight public adapters of the tenant "publisher"), plus
raw stubs and tenants made to attack it."""

from __future__ import annotations

import importlib.util
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from openlora.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc, worker_pb2_grpc


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_worker_fixtures = _load("adversarial_worker_fixtures", Path(__file__).parents[1] / "worker" / "conftest.py")
support = _worker_fixtures.support
tiny_model_dir = _worker_fixtures.tiny_model_dir
system = _worker_fixtures.system
WORKER_TOKEN = _worker_fixtures.WORKER_TOKEN
ADMIN_KEY = _worker_fixtures.ADMIN_KEY
BASE_MODEL = _worker_fixtures.BASE_MODEL
PUBLISHER = _worker_fixtures.PUBLISHER


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@dataclass
class Tenant:
    """A tenant with an admin key (admin + infer) and an infer-only key."""

    name: str
    admin_key: str
    admin_key_id: str
    infer_key: str
    infer_key_id: str


class Attacker:
    """Raw stubs on both servers of a running system, for hand-made (and malformed) calls."""

    def __init__(self, system) -> None:
        self.system = system
        self._cp_channel = grpc.insecure_channel(system.control_plane.target)
        self._worker_channel = grpc.insecure_channel(system.target)
        self.admin = admin_pb2_grpc.AdminServiceStub(self._cp_channel)
        self.workers = worker_pb2_grpc.WorkerServiceStub(self._cp_channel)
        self.inference = inference_pb2_grpc.InferenceServiceStub(self._worker_channel)

    def new_tenant(self) -> Tenant:
        name = f"t{uuid.uuid4().hex[:10]}"
        operator = bearer(ADMIN_KEY)
        self.admin.CreateTenant(admin_pb2.CreateTenantRequest(name=name), metadata=operator)
        keys = []
        for scopes in ([admin_pb2.SCOPE_ADMIN, admin_pb2.SCOPE_INFER], [admin_pb2.SCOPE_INFER]):
            response = self.admin.CreateApiKey(
                admin_pb2.CreateApiKeyRequest(tenant=name, scopes=scopes), metadata=operator
            )
            keys.append((response.secret, response.key.id))
        return Tenant(name, keys[0][0], keys[0][1], keys[1][0], keys[1][1])

    def push(self, tenant: Tenant, name: str, adapter: str | Path = "ad0", public: bool = False) -> str:
        """Uploads one of the fixture adapters' files (or the PEFT directory `adapter`) under `name` for
        `tenant`; returns its sha256."""
        from openlora.commands.demo_setup import upload_messages

        visibility = admin_pb2.VISIBILITY_PUBLIC if public else admin_pb2.VISIBILITY_PRIVATE
        directory = adapter if isinstance(adapter, Path) else self.system.model_dir / "adapters" / adapter
        response = self.admin.UploadAdapter(
            upload_messages(directory, "", BASE_MODEL, name=name, visibility=visibility),
            metadata=bearer(tenant.admin_key),
        )
        return response.adapter.sha256

    def generate(self, key: str, **fields) -> list[inference_pb2.GenerateResponse]:
        fields.setdefault("prompt", "hello world")
        fields.setdefault("sampling", inference_pb2.SamplingParams(max_tokens=2))
        return list(
            self.inference.Generate(inference_pb2.GenerateRequest(**fields), metadata=bearer(key), timeout=60)
        )

    def close(self) -> None:
        self._cp_channel.close()
        self._worker_channel.close()


@pytest.fixture(scope="module")
def attacker(system):
    attacker = Attacker(system)
    yield attacker
    attacker.close()


def status_of(call) -> grpc.StatusCode:
    """The status code a blocking call ends with (OK when it returns)."""
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK
