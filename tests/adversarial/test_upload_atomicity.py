"""Promise: no half-written adapter is ever served: a cancelled upload leaves nothing, concurrent uploads
of one name end in one consistent row, and a replaced adapter's old version is never served again once
the control plane resolves the name to the new one."""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid

import grpc
import pytest
from sqlalchemy import text

from control_plane.errors import FailedPrecondition
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
    from openlora.commands.demo_setup import upload_messages

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


def _sha256_of(attacker, tenant, name: str):
    get = lambda: attacker.admin.GetAdapter(  # noqa: E731
        admin_pb2.GetAdapterRequest(name=name), metadata=bearer(tenant.admin_key)
    )
    code = status_of(get)
    return get().adapter.sha256 if code == grpc.StatusCode.OK else code


def _open_ended_upload(attacker, tenant, directory, name: str, timeout_s: float | None = None):
    """Sends every message of an upload but never closes the stream (until `hold` is set): the call's
    future, the event set once all was sent, and `hold`."""
    from openlora.commands.demo_setup import upload_messages

    messages = list(upload_messages(directory, "", BASE_MODEL, name=name))
    sent_all, hold = threading.Event(), threading.Event()

    def stream():
        yield from messages
        sent_all.set()
        hold.wait(30)

    future = attacker.admin.UploadAdapter.future(
        stream(), metadata=bearer(tenant.admin_key), timeout=timeout_s
    )
    return future, sent_all, hold


def _cancel_after_the_last_byte(attacker, system, tenant, adapter: str, name: str) -> None:
    """Sends every byte of an upload of the fixture adapter `adapter` as `name`, cancels the call instead
    of closing the stream, and waits until the server let go of the upload's temporary files."""
    future, sent_all, hold = _open_ended_upload(
        attacker, tenant, system.model_dir / "adapters" / adapter, name
    )
    try:
        assert sent_all.wait(10)
        time.sleep(1.0)  # the server reads every byte of the stream (loopback) by then
        future.cancel()
    finally:
        hold.set()
    assert _wait_until(lambda: not any(_store(system).tmp_root.iterdir()))


@pytest.mark.parametrize("replacing", [False, True], ids=["new-name", "replacement"])
def test_upload_cancelled_after_its_last_byte_before_closing_stores_nothing(attacker, system, replacing):
    """A client that sent every byte but cancelled instead of closing its side was told CANCELLED: the
    upload must change nothing (grpc ends the server's request stream on a cancel as on a close)."""
    tenant = attacker.new_tenant()
    before = attacker.push(tenant, "held", adapter="ad2") if replacing else grpc.StatusCode.NOT_FOUND
    stored = set(_store(system).root.iterdir())
    _cancel_after_the_last_byte(attacker, system, tenant, "ad3", "held")
    time.sleep(0.5)  # a commit would have happened by now
    assert _sha256_of(attacker, tenant, "held") == before
    assert set(_store(system).root.iterdir()) == stored


def test_a_stream_ended_by_a_cancel_is_never_validated_or_published(attacker, system, monkeypatch):
    """The end of a stream waits END_OF_STREAM_GRACE_S for the call's cancellation before it counts as a
    close: a cancelled upload then never reaches validation and publication (the commit-time check alone
    rolls back what it published, after the work). With a grace long enough for any machine's cancellation
    to arrive, no upload stage may be reached."""
    from control_plane.server import admin_servicer

    monkeypatch.setattr(admin_servicer, "END_OF_STREAM_GRACE_S", 2.0)
    app = system.control_plane.app
    stages: list[str] = []
    app.upload_stage_hook = lambda stage, plan, sha256: plan.header.name == "graced" and stages.append(stage)
    tenant = attacker.new_tenant()
    try:
        _cancel_after_the_last_byte(attacker, system, tenant, "ad5", "graced")
        time.sleep(2.5)  # past the grace
    finally:
        app.upload_stage_hook = None
    assert stages == []
    assert _sha256_of(attacker, tenant, "graced") == grpc.StatusCode.NOT_FOUND


def test_upload_whose_deadline_passes_before_closing_stores_nothing(attacker, system):
    tenant = attacker.new_tenant()
    future, sent_all, hold = _open_ended_upload(
        attacker, tenant, system.model_dir / "adapters" / "ad3", "late", timeout_s=2.0
    )
    try:
        assert sent_all.wait(10)
        with pytest.raises(grpc.RpcError) as raised:
            future.result(timeout=30)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        hold.set()
    assert _wait_until(lambda: not any(_store(system).tmp_root.iterdir()))
    time.sleep(0.5)
    assert _sha256_of(attacker, tenant, "late") == grpc.StatusCode.NOT_FOUND


def test_upload_cancelled_while_it_is_being_stored_is_rolled_back(attacker, system, tmp_path):
    """The client closed its stream, then cancelled while the control plane validated and published the
    files: unless the row had already committed, nothing is kept (no row, no newly published files)."""
    from openlora.commands.demo_setup import upload_messages

    app = system.control_plane.app
    directory = _fresh_adapter(system, tmp_path / "fresh")
    tenant = attacker.new_tenant()
    stored = set(_store(system).root.iterdir())
    published, cancelled, failed = threading.Event(), threading.Event(), threading.Event()

    def hook(stage: str, plan, sha256: str) -> None:
        if plan.header.name != "mid-commit":
            return
        if stage == "published":
            published.set()
            assert cancelled.wait(30)
            time.sleep(0.5)  # the handler's cancellation reaches it
        elif stage == "failed":  # rolled back: its files are removed next
            failed.set()

    app.upload_stage_hook = hook
    try:
        future = attacker.admin.UploadAdapter.future(
            upload_messages(directory, "", BASE_MODEL, name="mid-commit"), metadata=bearer(tenant.admin_key)
        )
        assert published.wait(30)
        future.cancel()
        cancelled.set()
        assert failed.wait(30), "the upload was not rolled back"
        assert _wait_until(lambda: set(_store(system).root.iterdir()) == stored)
        assert _wait_until(lambda: not any(_store(system).tmp_root.iterdir()))
    finally:
        app.upload_stage_hook = None
        cancelled.set()
    assert _sha256_of(attacker, tenant, "mid-commit") == grpc.StatusCode.NOT_FOUND


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


def _fresh_adapter(system, out):
    """A copy of a fixture adapter whose content no upload has stored yet (another lora_alpha)."""
    shutil.copytree(system.model_dir / "adapters" / "ad4", out)
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["lora_alpha"] = 1 + uuid.uuid4().int % 10_000
    config_path.write_text(json.dumps(config))
    return out


def _advisory_lock_waiters(system) -> int:
    with system.control_plane.app.sessions.begin() as s:
        return s.scalar(text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"))


def test_failed_upload_never_removes_files_another_upload_of_that_content_is_recording(
    attacker, system, tmp_path
):
    """A publishes new files and its row write fails; before A removes the unreferenced files, B (same
    content, another tenant) finds them in place and is about to write its row. B's files must survive."""
    from openlora.commands.demo_setup import upload_messages

    app = system.control_plane.app
    directory = _fresh_adapter(system, tmp_path / "fresh")
    a, b = attacker.new_tenant(), attacker.new_tenant()
    a_failed, b_published, release_b = threading.Event(), threading.Event(), threading.Event()
    outcomes: dict[str, object] = {}

    def hook(stage: str, plan, sha256: str) -> None:
        if plan.header.name == "gc-a" and stage == "published":
            raise FailedPrecondition("forced failure of the row write", field="name")
        if plan.header.name == "gc-a" and stage == "failed":
            a_failed.set()
            assert b_published.wait(30)  # B found A's files in place; now A removes what is unreferenced
        if plan.header.name == "gc-b" and stage == "published":
            b_published.set()
            release_b.wait(30)

    def push(tenant, name: str) -> None:
        try:
            response = attacker.admin.UploadAdapter(
                upload_messages(directory, "", BASE_MODEL, name=name), metadata=bearer(tenant.admin_key)
            )
            outcomes[name] = response.adapter.sha256
        except grpc.RpcError as error:
            outcomes[name] = error.code()

    app.upload_stage_hook = hook
    try:
        first = threading.Thread(target=push, args=(a, "gc-a"))
        first.start()
        assert a_failed.wait(30)
        second = threading.Thread(target=push, args=(b, "gc-b"))
        second.start()
        assert b_published.wait(30)
        # A's cleanup now either waits for the artifact's lock that B holds, or (unsafe) already ran.
        assert _wait_until(lambda: not first.is_alive() or _advisory_lock_waiters(system) > 0, 30)
        release_b.set()
        first.join(60)
        second.join(60)
    finally:
        app.upload_stage_hook = None
        release_b.set()
        b_published.set()
    assert outcomes["gc-a"] == grpc.StatusCode.FAILED_PRECONDITION
    sha256 = outcomes["gc-b"]
    assert isinstance(sha256, str)
    assert {p.name for p in _store(system).path_of(sha256).iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    # B's adapter is really served: the worker fetches those files from the control plane.
    assert _greedy(attacker, b.infer_key, "gc-b")


def test_failed_upload_of_new_content_leaves_no_files(attacker, system, tmp_path):
    from openlora.commands.demo_setup import upload_messages

    app = system.control_plane.app
    directory = _fresh_adapter(system, tmp_path / "fresh")
    tenant = attacker.new_tenant()
    seen: list[str] = []

    def hook(stage: str, plan, sha256: str) -> None:
        seen.append(sha256)
        if stage == "published":
            assert _store(system).path_of(sha256).is_dir()
            raise FailedPrecondition("forced failure of the row write", field="name")

    app.upload_stage_hook = hook
    try:
        code = status_of(
            lambda: attacker.admin.UploadAdapter(
                upload_messages(directory, "", BASE_MODEL, name="gone"), metadata=bearer(tenant.admin_key)
            )
        )
    finally:
        app.upload_stage_hook = None
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert seen and not _store(system).path_of(seen[0]).exists()


def test_a_mix_created_while_an_upload_of_its_name_completes_leaves_one_owner_of_the_name(attacker, system):
    """The upload checked the name free of mixes when it began; a CreateMix of that name lands before its
    row is written. One of them must lose: the upload is refused ALREADY_EXISTS (both succeeded before,
    and the adapter hid behind the mix of the same name)."""
    app = system.control_plane.app
    tenant = attacker.new_tenant()
    attacker.push(tenant, "member", adapter="ad1")
    created: list[grpc.StatusCode] = []

    def hook(stage: str, plan, sha256: str) -> None:
        if plan.header.name == "contested" and stage == "published":
            created.append(
                status_of(
                    lambda: attacker.admin.CreateMix(
                        admin_pb2.CreateMixRequest(
                            name="contested",
                            members=[inference_pb2.AdapterWeight(adapter="member", weight=1)],
                        ),
                        metadata=bearer(tenant.admin_key),
                        timeout=30,
                    )
                )
            )

    app.upload_stage_hook = hook
    try:
        upload = status_of(lambda: attacker.push(tenant, "contested", adapter="ad2"))
    finally:
        app.upload_stage_hook = None
    assert created == [grpc.StatusCode.OK]
    assert upload == grpc.StatusCode.ALREADY_EXISTS
    adapters = attacker.admin.ListAdapters(admin_pb2.ListAdaptersRequest(), metadata=bearer(tenant.admin_key))
    assert [a.name for a in adapters.adapters] == ["member"]
