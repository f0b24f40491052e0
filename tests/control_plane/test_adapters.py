"""Adapter registry through AdminService: upload, dedup, replace, get, list, delete, visibility."""

from __future__ import annotations

import json

import grpc
import pytest

from openlora.artifact import digest_dir
from openlora.base_model import BaseModelSpec
from openlora.v1 import admin_pb2, worker_pb2

from .conftest import register_worker, tiny_llama_dict

BASE = "tiny-llama"


def _code(excinfo: pytest.ExceptionInfo) -> grpc.StatusCode:
    return excinfo.value.code()


@pytest.fixture(scope="module")
def tenants(cp) -> dict[str, str]:
    """Admin keys of two tenants, alpha and beta."""
    with cp.admin() as admin:
        keys = {}
        for name in ("alpha", "beta"):
            admin.create_tenant(name)
            keys[name] = admin.create_api_key(name, admin=True).secret
        return keys


def test_upload_registers_a_ready_adapter_with_its_peft_parameters(cp, tenants, adapters_root) -> None:
    with cp.admin(tenants["alpha"]) as alpha:
        response = alpha.upload_adapter(
            adapters_root / "a",
            name="sql",
            base_model=BASE,
            royalty_micros_per_million_tokens=5,
            description="d",
        )
        adapter = response.adapter
        assert not response.deduplicated
        assert adapter.status == admin_pb2.ADAPTER_STATUS_READY
        assert (adapter.tenant, adapter.name, adapter.base_model) == ("alpha", "sql", BASE)
        assert (adapter.rank, adapter.alpha) == (8, 16.0)
        assert list(adapter.target_modules) == ["q_proj", "v_proj", "down_proj"]
        assert adapter.sha256 == digest_dir(adapters_root / "a")
        assert adapter.visibility == admin_pb2.VISIBILITY_PRIVATE
        assert adapter.royalty_micros_per_million_tokens == 5
        assert (cp.config.state_dir / "artifacts" / adapter.sha256 / "adapter_model.safetensors").is_file()
        assert alpha.get_adapter("sql") == adapter


def test_identical_content_is_stored_once(cp, tenants, adapters_root) -> None:
    with cp.admin(tenants["alpha"]) as alpha:
        first = alpha.upload_adapter(adapters_root / "a", name="first-copy", base_model=BASE)
        second = alpha.upload_adapter(adapters_root / "a", name="second-copy", base_model=BASE)
    assert second.deduplicated and first.adapter.sha256 == second.adapter.sha256
    stored = [p for p in (cp.config.state_dir / "artifacts").iterdir() if p.name == first.adapter.sha256]
    assert len(stored) == 1


def test_an_upload_never_tells_that_another_tenant_holds_the_same_content(cp, adapters_root) -> None:
    """Another tenant's private adapter with identical bytes is stored once, but the upload reports no
    deduplication: the flag would tell the uploader who holds which weights."""
    with cp.admin() as admin:
        keys = {}
        for name in ("dedup-owner", "dedup-prober"):
            admin.create_tenant(name)
            keys[name] = admin.create_api_key(name, admin=True).secret
    with cp.admin(keys["dedup-owner"]) as alpha:
        mine = alpha.upload_adapter(adapters_root / "a", name="private-a", base_model=BASE)
    with cp.admin(keys["dedup-prober"]) as beta:
        theirs = beta.upload_adapter(adapters_root / "a", name="copy-of-a", base_model=BASE)
        again = beta.upload_adapter(adapters_root / "a", name="copy-again", base_model=BASE)
    assert theirs.adapter.sha256 == mine.adapter.sha256 and not theirs.deduplicated
    assert again.deduplicated  # against beta's own copy
    stored = [p for p in (cp.config.state_dir / "artifacts").iterdir() if p.name == mine.adapter.sha256]
    assert len(stored) == 1


def _fetch(cp, sha256: str) -> bytes:
    chunks = cp.worker_stub().FetchArtifact(
        worker_pb2.FetchArtifactRequest(sha256=sha256), metadata=cp.worker_metadata()
    )
    return b"".join(chunk.data for chunk in chunks)


def test_neither_an_upload_nor_its_first_fetch_takes_longer_when_another_tenant_holds_the_bytes(
    cp, adapter_copy, monkeypatch
) -> None:
    """Content is stored once, so the store reads its copy only for content the uploader holds itself: a
    digest of the stored copy (seconds for a large adapter) made an upload of another tenant's private
    bytes slower than one of new bytes, and a fetch after it skipped the digest its first fetch of new
    bytes paid once another tenant's worker had fetched them. Both told the uploader that someone holds,
    and serves, those weights."""
    with cp.admin() as admin:
        keys = {}
        for name in ("timing-owner", "timing-prober"):
            admin.create_tenant(name)
            keys[name] = admin.create_api_key(name, admin=True).secret
    held, fresh = adapter_copy("a"), adapter_copy("b")
    for path, alpha in ((held, 29), (fresh, 30)):  # content nobody else in this module has
        config = path / "adapter_config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "lora_alpha": alpha}))
    with cp.admin(keys["timing-owner"]) as owner:
        secret = owner.upload_adapter(held, name="secret", base_model=BASE).adapter.sha256
    _fetch(cp, secret)  # the owner's worker fetched it: the store has checked its copy
    store = cp.running.app.store
    digests = []
    digest = store._digest
    monkeypatch.setattr(
        store, "_digest", lambda directory: digests.append(directory.name) or digest(directory)
    )
    with cp.admin(keys["timing-prober"]) as prober:
        for path in (held, fresh):
            sha256 = prober.upload_adapter(path, name=f"probe-{path.name}", base_model=BASE).adapter.sha256
            assert _fetch(cp, sha256)
    assert digests == []  # the same work for bytes another tenant holds as for new bytes
    assert digest_dir(cp.config.state_dir / "artifacts" / secret) == secret
    with cp.admin(keys["timing-owner"]) as owner:  # its own content: checked (and repaired) in place
        assert owner.upload_adapter(held, name="secret-again", base_model=BASE).deduplicated
    assert digests == [secret]


def test_reupload_replaces_the_artifact_under_the_same_id(cp, tenants, adapters_root) -> None:
    with cp.admin(tenants["alpha"]) as alpha:
        old = alpha.upload_adapter(adapters_root / "a", name="evolving", base_model=BASE).adapter
        new = alpha.upload_adapter(adapters_root / "b", name="evolving", base_model=BASE).adapter
        assert new.id == old.id and new.sha256 != old.sha256 and new.rank == 4
        assert alpha.get_adapter("evolving").sha256 == new.sha256


def test_private_adapter_of_another_tenant_is_not_found_and_public_is_visible(
    cp, tenants, adapters_root
) -> None:
    with cp.admin(tenants["alpha"]) as alpha:
        alpha.upload_adapter(adapters_root / "a", name="secret", base_model=BASE)
        alpha.upload_adapter(adapters_root / "b", name="shared", base_model=BASE, public=True)
    with cp.admin(tenants["beta"]) as beta:
        with pytest.raises(grpc.RpcError) as hidden:
            beta.get_adapter("secret")
        with pytest.raises(grpc.RpcError) as never:
            beta.get_adapter("never-existed")
        assert _code(hidden) == _code(never) == grpc.StatusCode.NOT_FOUND
        assert hidden.value.details().replace("secret", "X") == never.value.details().replace(
            "never-existed", "X"
        )
        shared = beta.get_adapter("shared")
        assert shared.tenant == "alpha" and shared.visibility == admin_pb2.VISIBILITY_PUBLIC
        names = {a.name for a in beta.list_adapters(include_public=True)}
        assert "shared" in names and "secret" not in names
        assert list(beta.list_adapters()) == []


def test_operator_acts_for_a_tenant_and_list_pages(cp, tenants, adapters_root) -> None:
    with cp.admin() as operator:
        for i in range(5):
            operator.upload_adapter(adapters_root / "b", name=f"paged-{i}", base_model=BASE, tenant="beta")
        listed = [a.name for a in operator.list_adapters(tenant="beta", page_size=2)]
        assert listed == [f"paged-{i}" for i in range(5)]
        assert operator.get_adapter("paged-3", tenant="beta").tenant == "beta"
        with pytest.raises(grpc.RpcError) as e:
            list(operator.list_adapters(tenant="beta", page_size=5000))
        assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT and "page_size" in e.value.details()


def test_deleted_adapter_is_gone_and_only_its_owner_may_delete(cp, tenants, adapters_root) -> None:
    with cp.admin(tenants["alpha"]) as alpha:
        alpha.upload_adapter(adapters_root / "a", name="doomed", base_model=BASE, public=True)
    with cp.admin(tenants["beta"]) as beta, pytest.raises(grpc.RpcError) as e:
        beta.delete_adapter("doomed")
    assert _code(e) == grpc.StatusCode.NOT_FOUND
    with cp.admin(tenants["alpha"]) as alpha:
        deleted = alpha.delete_adapter("doomed")
        assert deleted.status == admin_pb2.ADAPTER_STATUS_DELETED
        with pytest.raises(grpc.RpcError) as e:
            alpha.get_adapter("doomed")
        assert _code(e) == grpc.StatusCode.NOT_FOUND
        assert "doomed" not in {a.name for a in alpha.list_adapters()}
        # The name may be used again.
        assert (
            alpha.upload_adapter(adapters_root / "b", name="doomed", base_model=BASE).adapter.id == deleted.id
        )


def test_an_upload_without_base_model_among_several_names_the_registered_ones(cp, tenants, adapters_root):
    """`openlora adapters push` without --base-model after a second base model was registered (an `up
    --model DIR` once) said only that the field is required; it now names what to choose from."""
    register_worker(cp, BaseModelSpec.from_hf_config(tiny_llama_dict(), "other-llama"), worker_id="other")
    with cp.admin(tenants["alpha"]) as alpha, pytest.raises(grpc.RpcError) as excinfo:
        alpha.upload_adapter(adapters_root / "a", name="no-base", base_model="")
    assert _code(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
    assert excinfo.value.details() == (
        f"base_model: required when not exactly one base model is registered: name one of "
        f"'other-llama', '{BASE}'"
    )
