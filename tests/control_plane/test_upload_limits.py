"""Uploads cannot fill the control plane's disk: a tenant has at most MAX_UPLOADS_IN_FLIGHT_PER_TENANT
uploads open at once (MAX_UPLOADS_IN_FLIGHT across tenants), the next refused with RESOURCE_EXHAUSTED, and
a stream left idle is ended by the server with DEADLINE_EXCEEDED, its partial files removed at once.
Every way an upload ends gives its slot back. (Before, a tenant's admin key could open any number of
streams, write part of each and go idle: the partial files stayed until the client hung up.)"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import psycopg
import pytest

from control_plane.artifacts.slots import (
    MAX_UPLOADS_IN_FLIGHT,
    MAX_UPLOADS_IN_FLIGHT_PER_TENANT,
    RESERVED_FOR_NEW_TENANTS,
)
from control_plane.server import admin_servicer
from openlora.v1 import admin_pb2, admin_pb2_grpc

from .uploads import dir_files, raw_upload

CONFIG = "adapter_config.json"
FIRST_CHUNK_BYTES = 16


class HeldUpload:
    """An UploadAdapter stream that sends its header and the first bytes of the config (or nothing at all,
    with `send_header=False`), then idles until `finish()` sends the rest or `cancel()` hangs up."""

    def __init__(self, cp, key: str, name: str, files: list[tuple[str, bytes]], send_header: bool = True):
        self._go = threading.Event()
        self._cancelled = False
        header = admin_pb2.UploadAdapterHeader(name=name, base_model="tiny-llama")
        for filename, data in files:
            header.files.add(filename=filename, size_bytes=len(data))
        (config, config_data), (weights, weights_data) = files

        def chunk(filename: str, offset: int, data: bytes) -> admin_pb2.UploadAdapterRequest:
            return admin_pb2.UploadAdapterRequest(
                chunk=admin_pb2.FileChunk(filename=filename, offset=offset, data=data)
            )

        def stream():
            if send_header:
                yield admin_pb2.UploadAdapterRequest(header=header)
                yield chunk(config, 0, config_data[:FIRST_CHUNK_BYTES])
            self._go.wait()
            if self._cancelled or not send_header:
                return
            yield chunk(config, FIRST_CHUNK_BYTES, config_data[FIRST_CHUNK_BYTES:])
            yield chunk(weights, 0, weights_data)

        self._channel = grpc.insecure_channel(cp.target)
        stub = admin_pb2_grpc.AdminServiceStub(self._channel)
        self.future = stub.UploadAdapter.future(
            stream(), metadata=(("authorization", f"Bearer {key}"),), timeout=120
        )

    def finish(self) -> admin_pb2.UploadAdapterResponse:
        self._go.set()
        return self.future.result(timeout=60)

    def cancel(self) -> None:
        self._cancelled = True
        self.future.cancel()
        self._go.set()

    def close(self) -> None:
        self.cancel()
        self._channel.close()


def _tmp_dir(cp):
    return cp.config.state_dir / "artifacts" / ".tmp"


def _partial_uploads(cp) -> list:
    return sorted(_tmp_dir(cp).iterdir())


def _partial_files(cp) -> list:
    return sorted(p for p in _tmp_dir(cp).rglob("*") if p.is_file())


def _rows(cp, name: str) -> int:
    with psycopg.connect(cp.config.database_url) as conn:
        (rows,) = conn.execute("SELECT count(*) FROM adapter WHERE name = %s", (name,)).fetchone()
    return rows


def _wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


def _wait_idle(cp) -> None:
    """No upload in flight: every slot free and the temporary directory empty."""
    slots = cp.running.app.upload_slots
    _wait_until(lambda: slots.num_in_flight() == 0 and not _partial_uploads(cp), "no upload is in flight")


def _tenant_key(cp, tenant: str) -> str:
    with cp.admin() as admin:
        admin.create_tenant(tenant)
        return admin.create_api_key(tenant, admin=True).secret


@pytest.fixture
def held(cp) -> Iterator[Callable[..., HeldUpload]]:
    """held(key, name, files) -> a HeldUpload, cancelled at the end of the test."""
    _wait_idle(cp)
    opened: list[HeldUpload] = []

    def open_upload(key: str, name: str, files, **kwargs) -> HeldUpload:
        opened.append(HeldUpload(cp, key, name, files, **kwargs))
        return opened[-1]

    yield open_upload
    for upload in opened:
        upload.close()
    _wait_idle(cp)


def _hold_all(cp, held, uploads: list[tuple[str, str]], files) -> list[HeldUpload]:
    """Opens one held upload per (key, name) and waits until the server has begun every one."""
    expected = len(_partial_uploads(cp)) + len(uploads)
    opened = [held(key, name, files) for key, name in uploads]
    _wait_until(
        lambda: len(_partial_uploads(cp)) == expected or any(u.future.done() for u in opened),
        f"{len(uploads)} uploads are in flight",
    )
    ended = [u.future.exception() for u in opened if u.future.done()]
    assert not ended, f"an upload that should be open ended: {ended}"
    return opened


def _refused_as_exhausted(cp, files, key: str, name: str, in_flight: str) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        raw_upload(cp, files, name=name, key=key)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
    assert f"{in_flight} uploads in flight" in refused.value.details()
    assert "retry when one of them finishes" in refused.value.details()
    assert _rows(cp, name) == 0


def _assert_tenant_has_all_its_slots(cp, held, key: str, files, tag: str) -> None:
    """The tenant can open exactly MAX_UPLOADS_IN_FLIGHT_PER_TENANT uploads, no more."""
    names = [f"{tag}-fill-{i}" for i in range(MAX_UPLOADS_IN_FLIGHT_PER_TENANT)]
    opened = _hold_all(cp, held, [(key, name) for name in names], files)
    _refused_as_exhausted(cp, files, key, f"{tag}-over", str(MAX_UPLOADS_IN_FLIGHT_PER_TENANT))
    for upload in opened:
        upload.cancel()
    _wait_idle(cp)


def test_a_tenant_past_its_uploads_in_flight_is_refused_until_one_finishes(cp, adapter_copy, held) -> None:
    files = dir_files(adapter_copy("a"))
    busy = _tenant_key(cp, "busy")
    calm = _tenant_key(cp, "calm")
    names = [f"busy-{i}" for i in range(MAX_UPLOADS_IN_FLIGHT_PER_TENANT)]
    opened = _hold_all(cp, held, [(busy, name) for name in names], files)

    _refused_as_exhausted(cp, files, busy, "busy-over", str(MAX_UPLOADS_IN_FLIGHT_PER_TENANT))
    # The limit is the tenant's own: another tenant uploads as usual meanwhile.
    assert raw_upload(cp, files, name="calm-0", key=calm).adapter.name == "calm-0"

    # A finished upload gives its slot back before its answer is sent.
    assert opened[0].finish().adapter.name == names[0]
    assert raw_upload(cp, files, name="busy-after", key=busy).adapter.name == "busy-after"
    assert opened[1].finish().adapter.name == names[1]
    assert _rows(cp, "busy-over") == 0


def test_uploads_of_all_tenants_together_are_capped(cp, adapter_copy, held) -> None:
    """Tenants holding their share fill the slots but the last RESERVED_FOR_NEW_TENANTS, which go to
    tenants with no upload in flight (four colluding tenants held all 16 and locked everyone out, the
    operator included); past the cap everyone is refused."""
    files = dir_files(adapter_copy("a"))
    num_full = (MAX_UPLOADS_IN_FLIGHT - RESERVED_FOR_NEW_TENANTS) // MAX_UPLOADS_IN_FLIGHT_PER_TENANT
    keys = [_tenant_key(cp, f"crowd-{t}") for t in range(num_full + 1)]
    uploads = [
        (key, f"crowd-{t}-{i}")
        for t, key in enumerate(keys[:num_full])
        for i in range(MAX_UPLOADS_IN_FLIGHT_PER_TENANT)
    ]
    # The crowd first: had the last tenant's upload arrived among them, it would have taken an unreserved
    # slot and left the crowd's last one to be refused (a race of the test, not of the rule).
    _hold_all(cp, held, uploads, files)
    _hold_all(cp, held, [(keys[-1], f"crowd-{num_full}-0")], files)
    # a tenant already uploading may not take a reserved slot; one with none may
    with pytest.raises(grpc.RpcError) as refused:
        raw_upload(cp, files, name=f"crowd-{num_full}-1", key=keys[-1])
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"keeps its last {RESERVED_FOR_NEW_TENANTS} for tenants with none" in refused.value.details()
    newcomers = [_tenant_key(cp, f"new-{t}") for t in range(RESERVED_FOR_NEW_TENANTS - 1)]
    _hold_all(cp, held, [(key, f"new-{t}-0") for t, key in enumerate(newcomers)], files)
    late = _tenant_key(cp, "late")
    _refused_as_exhausted(cp, files, late, "late-0", str(MAX_UPLOADS_IN_FLIGHT))


@pytest.mark.parametrize("send_header", [True, False], ids=["after-a-chunk", "before-the-header"])
def test_an_idle_upload_is_ended_and_its_files_removed_at_once(
    cp, adapter_copy, held, monkeypatch, send_header
) -> None:
    files = dir_files(adapter_copy("a"))
    key = _tenant_key(cp, f"idle-{int(send_header)}")
    monkeypatch.setattr(admin_servicer, "UPLOAD_IDLE_TIMEOUT_S", 1.0)
    idle = held(key, "idle", files, send_header=send_header)
    if send_header:
        _wait_until(lambda: len(_partial_files(cp)) == 1, "the first chunk is on disk")

    error = idle.future.exception(timeout=10)  # the client's own deadline is 120 s
    assert isinstance(error, grpc.RpcError)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error.details()
    assert "no upload message arrived for 1 s" in error.details()
    # Removed before the status was sent, and the slot given back with them.
    assert _partial_uploads(cp) == []
    assert cp.running.app.upload_slots.num_in_flight() == 0
    assert _rows(cp, "idle") == 0

    monkeypatch.undo()
    _assert_tenant_has_all_its_slots(cp, held, key, files, f"idle-{int(send_header)}")


def _bad_config(files: list[tuple[str, bytes]], cp) -> list[tuple[str, bytes]]:
    config = json.loads(files[0][1])
    config["r"] = cp.config.max_lora_rank + 1
    return [(CONFIG, json.dumps(config).encode()), files[1]]


@pytest.mark.parametrize("ending", ["bad-config", "bad-manifest", "chunk-too-long", "client-cancel"])
def test_every_ending_gives_the_slot_back(cp, adapter_copy, held, ending) -> None:
    files = dir_files(adapter_copy("a"))
    key = _tenant_key(cp, f"ends-{ending}")
    # More endings than slots: one slot kept by each would refuse the later ones.
    for attempt in range(MAX_UPLOADS_IN_FLIGHT_PER_TENANT + 1):
        name = f"ends-{attempt}"
        if ending == "client-cancel":
            (upload,) = _hold_all(cp, held, [(key, name)], files)
            upload.cancel()
            _wait_idle(cp)
            continue
        with pytest.raises(grpc.RpcError) as refused:
            if ending == "bad-config":
                raw_upload(cp, _bad_config(files, cp), name=name, key=key)
            elif ending == "bad-manifest":
                raw_upload(cp, [files[0], ("adapter_model.bin", b"\x80\x04")], name=name, key=key)
            else:
                raw_upload(cp, files, name=name, key=key, declared_sizes={files[1][0]: 10})
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
        assert _rows(cp, name) == 0
    _wait_idle(cp)
    _assert_tenant_has_all_its_slots(cp, held, key, files, f"ends-{ending}")


def _trickled_upload(cp, files, key: str, name: str) -> grpc.RpcError:
    """Uploads `files` as `name`, sending the first file one byte every 0.2 s (never idle for the 30 s
    limit); returns the RpcError that ended it, which must be DEADLINE_EXCEEDED."""
    (config, config_data), _ = files
    header = admin_pb2.UploadAdapterHeader(name=name, base_model="tiny-llama")
    for filename, data in files:
        header.files.add(filename=filename, size_bytes=len(data))

    def stream():
        yield admin_pb2.UploadAdapterRequest(header=header)
        for offset in range(len(config_data)):
            time.sleep(0.2)
            yield admin_pb2.UploadAdapterRequest(
                chunk=admin_pb2.FileChunk(
                    filename=config, offset=offset, data=config_data[offset : offset + 1]
                )
            )

    with grpc.insecure_channel(cp.target) as channel, pytest.raises(grpc.RpcError) as ended:
        admin_pb2_grpc.AdminServiceStub(channel).UploadAdapter(
            stream(), metadata=(("authorization", f"Bearer {key}"),), timeout=60
        )
    assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, ended.value.details()
    return ended.value


def test_an_upload_trickling_past_its_time_limit_is_ended_and_its_files_removed(
    cp, adapter_copy, monkeypatch
):
    """A byte now and then keeps a stream from idling; the upload's whole time is bounded by its size."""
    files = dir_files(adapter_copy("a"))
    key = _tenant_key(cp, "trickle")
    monkeypatch.setattr(admin_servicer, "UPLOAD_BASE_S", 1.0)
    monkeypatch.setattr(admin_servicer, "UPLOAD_MIN_BYTES_PER_S", 1 << 40)  # the limit: about 1 s in all
    monkeypatch.setattr(admin_servicer, "UPLOAD_MIN_PROGRESS_BYTES_PER_S", 0)  # the time limit alone
    ended = _trickled_upload(cp, files, key, "trickle")
    assert "the upload took more than 1 s" in ended.details()
    assert _partial_uploads(cp) == []
    assert cp.running.app.upload_slots.num_in_flight() == 0
    assert _rows(cp, "trickle") == 0


def test_an_upload_slower_than_the_minimum_rate_is_ended_long_before_its_time_limit(
    cp, adapter_copy, monkeypatch
):
    """Declaring a large size and sending a byte now and then held a slot for the whole time limit of
    that size (35 minutes for 512 MiB); past its first UPLOAD_BASE_S an upload must average the minimum
    rate (here 1 MiB/s after 0.5 s, with a time limit of hours)."""
    files = dir_files(adapter_copy("a"))
    key = _tenant_key(cp, "crawl")
    monkeypatch.setattr(admin_servicer, "UPLOAD_BASE_S", 0.5)
    monkeypatch.setattr(admin_servicer, "UPLOAD_MIN_BYTES_PER_S", 1)  # the time limit: hours
    monkeypatch.setattr(admin_servicer, "UPLOAD_MIN_PROGRESS_BYTES_PER_S", 1 << 20)
    ended = _trickled_upload(cp, files, key, "crawl")
    assert "slower than 1024 KiB/s after its first 0.5 s" in ended.details()
    assert _partial_uploads(cp) == []
    assert cp.running.app.upload_slots.num_in_flight() == 0
    assert _rows(cp, "crawl") == 0
