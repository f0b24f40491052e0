"""Promise: no half-written adapter is ever served: a cancelled upload leaves nothing, concurrent uploads
of one name end in one consistent row, and a replaced adapter's old version is never served again once
the control plane resolves the name to the new one."""

from __future__ import annotations

import threading
import time

import grpc

from openlora.v1 import admin_pb2, inference_pb2

from .conftest import BASE_MODEL, bearer, status_of


def _store(system):
    return system.control_plane.app.store


def _wait_until(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_upload_cancelled_mid_stream_leaves_no_row_and_no_files(attacker, system):
    from openlora.commands.up import upload_messages

    tenant = attacker.new_tenant()
    before = set(_store(system).root.iterdir())
    sent_some = threading.Event()
    hold = threading.Event()

    def messages():
        source = upload_messages(system.model_dir / "adapters" / "ad5", "", BASE_MODEL, name="half")
        yield next(source)  # header
        yield next(source)  # the first chunk
        sent_some.set()
        hold.wait(30)  # the client never finishes the stream

    future = attacker.admin.UploadAdapter.future(messages(), metadata=bearer(tenant.admin_key))
    assert sent_some.wait(10)
    assert _wait_until(lambda: any(_store(system).tmp_root.iterdir()))  # the server is receiving
    future.cancel()
    hold.set()
    assert _wait_until(lambda: not any(_store(system).tmp_root.iterdir()))
    assert set(_store(system).root.iterdir()) == before
    get = lambda: attacker.admin.GetAdapter(  # noqa: E731
        admin_pb2.GetAdapterRequest(name="half"), metadata=bearer(tenant.admin_key)
    )
    assert status_of(get) == grpc.StatusCode.NOT_FOUND


def test_concurrent_uploads_of_one_name_end_in_one_row_whose_files_exist(attacker, system):
    tenant = attacker.new_tenant()
    outcomes: dict[str, object] = {}

    def push(source: str) -> None:
        try:
            outcomes[source] = attacker.push(tenant, "race", adapter=source)
        except grpc.RpcError as error:
            outcomes[source] = error.code()

    for _ in range(3):
        threads = [threading.Thread(target=push, args=(s,)) for s in ("ad6", "ad7")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert set(outcomes.values()) - {grpc.StatusCode.ALREADY_EXISTS} <= {
            system.adapters["ad6"],
            system.adapters["ad7"],
        }
        row = attacker.admin.GetAdapter(
            admin_pb2.GetAdapterRequest(name="race"), metadata=bearer(tenant.admin_key)
        ).adapter
        assert row.sha256 in {v for v in outcomes.values() if isinstance(v, str)}
        assert _store(system).path_of(row.sha256).is_dir()
        assert {p.name for p in _store(system).path_of(row.sha256).iterdir()} == {
            "adapter_config.json",
            "adapter_model.safetensors",
        }
        listed = attacker.admin.ListAdapters(
            admin_pb2.ListAdaptersRequest(), metadata=bearer(tenant.admin_key)
        )
        assert [a.name for a in listed.adapters] == ["race"]
    assert not any(_store(system).tmp_root.iterdir())


def _greedy(attacker, key: str, adapter: str) -> list[int]:
    replies = attacker.generate(
        key,
        adapter=adapter,
        prompt="the quick brown fox",
        sampling=inference_pb2.SamplingParams(max_tokens=12, temperature=0.0),
    )
    return [t for r in replies for t in r.token_ids]


def test_replaced_adapter_is_never_served_in_its_old_version_once_resolved_to_the_new(attacker, system):
    tenant = attacker.new_tenant()
    attacker.push(tenant, "old-copy", adapter="ad2")
    attacker.push(tenant, "new-copy", adapter="ad3")
    old_tokens = _greedy(attacker, tenant.infer_key, "old-copy")
    new_tokens = _greedy(attacker, tenant.infer_key, "new-copy")
    assert old_tokens != new_tokens

    attacker.push(tenant, "mine", adapter="ad2")
    assert _greedy(attacker, tenant.infer_key, "mine") == old_tokens  # the worker now holds the old one
    new_sha256 = attacker.push(tenant, "mine", adapter="ad3")
    resolved = system.loop.run(system.worker.control_plane.authorize(tenant.infer_key, ("mine",), BASE_MODEL))
    # Within the authorisation cache's TTL the worker may still answer from the old resolution; once
    # Authorize returns the new sha256, every call serves the new version.
    assert _wait_until(
        lambda: (
            system.loop.run(system.worker.control_plane.authorize(tenant.infer_key, ("mine",), BASE_MODEL))
            .adapters[0]
            .sha256
            == new_sha256
        )
    ), resolved
    for _ in range(3):
        assert _greedy(attacker, tenant.infer_key, "mine") == new_tokens
