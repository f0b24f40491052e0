"""An artifact damaged in the control plane's store (a byte changed on its disk) is refused with
DATA_LOSS, logged, never streamed to workers; an upload of the same content repairs it. Before, every call
failed with UNAVAILABLE "retry" for good, and a re-push answered "identical content already stored"."""

from __future__ import annotations

import logging
import shutil
import time
import uuid

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

from control_plane.artifacts.store import ArtifactDamaged, ArtifactStore
from openlora.artifact import digest_dir
from openlora.v1 import inference_pb2, inference_pb2_grpc

from .conftest import BASE_MODEL

WEIGHTS = "adapter_model.safetensors"


def _unique_adapter(system, tmp_path):
    """A copy of a test adapter with its own content (no worker holds it)."""
    source = system.model_dir / "adapters" / sorted(system.adapters)[0]
    path = tmp_path / f"unique-{uuid.uuid4().hex[:6]}"
    shutil.copytree(source, path)
    tensors = load_file(path / WEIGHTS)
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + torch.rand_like(tensors[first])
    save_file(tensors, path / WEIGHTS)
    return path


def _damage(directory) -> None:
    weights = directory / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))


def _generate(system, key: str, adapter: str) -> list:
    with grpc.insecure_channel(system.target) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        request = inference_pb2.GenerateRequest(
            prompt="hello", adapter=adapter, sampling=inference_pb2.SamplingParams(max_tokens=2)
        )
        return list(stub.Generate(request, metadata=(("authorization", f"Bearer {key}"),), timeout=60))


def test_a_damaged_stored_artifact_is_data_loss_and_a_new_upload_of_it_repairs_it(system, tmp_path, caplog):
    tenant, _, key = system.new_tenant()
    adapter = _unique_adapter(system, tmp_path)
    sha = system.admin.push(adapter, "fragile", tenant, BASE_MODEL)
    _damage(system.cp_state_dir / "artifacts" / sha)
    with caplog.at_level(logging.ERROR), pytest.raises(grpc.RpcError) as refused:
        _generate(system, key, "fragile")
    assert refused.value.code() == grpc.StatusCode.DATA_LOSS
    assert "upload the adapter again" in refused.value.details()
    assert any(sha in record.getMessage() and "digest" in record.getMessage() for record in caplog.records)
    assert not _push(system, adapter, tenant).deduplicated  # it repaired the copy: not "already stored"
    assert digest_dir(system.cp_state_dir / "artifacts" / sha) == sha
    assert sum(len(r.token_ids) for r in _generate(system, key, "fragile")) == 2
    assert _push(system, adapter, tenant).deduplicated  # intact now: the same content, stored once


def _push(system, adapter, tenant: str, name: str = "fragile"):
    from openlora.commands.demo_setup import upload_messages

    messages = upload_messages(adapter, tenant, BASE_MODEL, name=name)
    return system.admin.stub.UploadAdapter(messages, metadata=system.admin.metadata)


def test_the_store_checks_a_copy_before_serving_it_and_again_after_its_files_change(system, tmp_path):
    store = ArtifactStore(tmp_path / "store")
    adapter = _unique_adapter(system, tmp_path)
    sha = digest_dir(adapter)
    upload = tmp_path / "incoming"
    shutil.copytree(adapter, upload)
    assert store.publish(upload, sha)
    assert [p.name for p in store.files(sha)] == sorted(p.name for p in adapter.iterdir() if p.is_file())
    _damage(store.path_of(sha))
    with pytest.raises(ArtifactDamaged):
        store.files(sha)
    again = tmp_path / "again"
    shutil.copytree(adapter, again)
    assert store.publish(again, sha)  # replaced, not "already stored"
    assert digest_dir(store.path_of(sha)) == sha
    store.files(sha)
    intact = tmp_path / "intact"
    shutil.copytree(adapter, intact)
    assert not store.publish(intact, sha)  # an intact copy stays
    assert not intact.exists()


def test_a_stored_artifact_gone_from_the_store_is_data_loss_not_an_unknown_adapter(system, tmp_path, caplog):
    """An adapter whose stored copy was removed (a store restored from an older backup): its calls are
    refused DATA_LOSS saying what to do. The control plane answered NOT_FOUND for the artifact, and the
    worker passed it on: the tenant was told its adapter did not exist (HTTP: model_not_found)."""
    tenant, _, key = system.new_tenant()
    adapter = _unique_adapter(system, tmp_path)
    sha = system.admin.push(adapter, "vanished", tenant, BASE_MODEL)
    shutil.rmtree(system.cp_state_dir / "artifacts" / sha)
    with caplog.at_level(logging.ERROR), pytest.raises(grpc.RpcError) as refused:
        _generate(system, key, "vanished")
    assert refused.value.code() == grpc.StatusCode.DATA_LOSS
    assert "missing" in refused.value.details() and "upload the adapter again" in refused.value.details()
    assert any(sha in record.getMessage() and "missing" in record.getMessage() for record in caplog.records)
    _push(system, adapter, tenant, name="vanished")  # restores the copy
    assert sum(len(r.token_ids) for r in _generate(system, key, "vanished")) == 2


def test_a_local_copy_that_fails_to_load_is_retried_once_then_refused(system, tmp_path, monkeypatch):
    """A copy on the worker's disk that fails to load is dropped and the call told to retry (UNAVAILABLE:
    its bytes changed on this disk). A copy fetched anew that fails the same way is the adapter itself (a
    file the validator passes and the reader refuses): FAILED_PRECONDITION, not a retry without end. Once
    a call of it succeeds, a later failure is a damaged copy again."""
    from data_plane.engine import adapter_loader
    from data_plane.engine.errors import AdapterLoadError

    tenant, _, key = system.new_tenant()
    adapter = _unique_adapter(system, tmp_path)
    sha = system.admin.push(adapter, "unreadable", tenant, BASE_MODEL)
    cache_key = system.private_cache_key(tenant, sha)
    read = adapter_loader.read_packed_adapter  # how the loader reads one adapter
    refusing = [True]

    def refused_read(path, *args, **kwargs):
        if refusing[0] and path.name == cache_key:
            raise AdapterLoadError("adapter.adapter_model.safetensors", "header is not valid JSON")
        return read(path, *args, **kwargs)

    monkeypatch.setattr(adapter_loader, "read_packed_adapter", refused_read)
    codes = []
    for _ in range(2):
        with pytest.raises(grpc.RpcError) as failed:
            _generate(system, key, "unreadable")
        codes.append(failed.value.code())
    assert codes == [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION]
    refusing[0] = False
    assert sum(len(r.token_ids) for r in _generate(system, key, "unreadable")) == 2
    engine = system.worker.engine
    engine.invalidate(cache_key)  # read from disk again by the next call
    deadline = time.monotonic() + 30
    while cache_key in engine.resident_adapter_keys() + engine.host_adapter_keys():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    refusing[0] = True
    with pytest.raises(grpc.RpcError) as failed:
        _generate(system, key, "unreadable")
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
