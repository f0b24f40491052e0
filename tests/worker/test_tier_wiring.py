"""The worker wired to the tiers: hints through a Redis that goes away and comes back, keep-warm from the
registry, a deleted adapter's engine slot freed, the local disk budget never removing an artifact in use."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis
from sqlalchemy import update
from worker_test_support import start_redis

from control_plane.hints.publisher import HintPublisher
from control_plane.registry.models import Adapter
from data_plane.adapters.hint_actions import residency_key
from openlora import errors
from openlora.client import Client

from .conftest import AUTH_TTL_S

BASE_MODEL = "tiny"


class PrivateRedis:
    """A redis-server of this test's own, stopped and started at will (no persistence): its first start
    picks a free port (another when that one was taken before the server bound it), later ones reuse it."""

    def __init__(self, workdir: Path) -> None:
        self.port: int | None = None
        self._workdir = workdir
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        if shutil.which("redis-server") is None:
            pytest.fail("the redis-server binary is required")
        self._process, self.port = start_redis(self._workdir, self.port)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)
            self._process = None


@pytest.fixture
def private_redis(tmp_path):
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def _push_variant(system, tmp_path: Path, name: str, tenant: str, alpha: int) -> str:
    """A private copy of a demo adapter with its own content (so its own sha256)."""
    src = tmp_path / name
    shutil.copytree(system.model_dir / "adapters" / "ad6", src)
    config = src / "adapter_config.json"
    config.write_text(config.read_text().replace('"lora_alpha": 16', f'"lora_alpha": {alpha}'))
    return system.admin.push(src, name, tenant, BASE_MODEL)


def _wait_for(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_streams_go_on_while_redis_is_down_and_an_invalidation_after_it_returns_still_arrives(
    system, make_worker, private_redis, tmp_path
):
    worker = make_worker(private_redis.url, residency_interval_s=0.1)
    tenant, _, key = system.new_tenant(admin=True)
    sha = _push_variant(system, tmp_path, "flaky", tenant, alpha=11)
    key_of_sha = system.private_cache_key(tenant, sha)  # a private adapter: cached under its owner's scope
    with Client(f"127.0.0.1:{worker.port}", key) as client:
        stream = client.generate_stream("hello", adapter="flaky", max_tokens=48)
        first = next(stream)
        private_redis.stop()  # mid-stream
        rest = list(stream)
        assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == 48
        assert rest[-1].usage.completion_tokens == 48
        assert client.complete("hello", adapter="flaky", max_tokens=4)  # a new stream, Redis still down
        assert key_of_sha in worker.engine.resident_adapter_keys()

        private_redis.start()
        client_redis = redis.Redis(port=private_redis.port, decode_responses=True)

        def residency_lists_it() -> bool:
            fields = client_redis.hgetall(residency_key(worker.worker_id))
            return bool(fields) and key_of_sha in json.loads(fields["device_adapters"])

        assert _wait_for(residency_lists_it), "the residency heartbeat did not resume"
        artifact = worker.config.artifacts_dir / key_of_sha
        assert artifact.is_dir()
        publisher = HintPublisher(private_redis.url)
        try:
            assert publisher.invalidate("unknown-id", sha)
        finally:
            publisher.close()
        assert _wait_for(
            lambda: key_of_sha not in worker.engine.resident_adapter_keys() and not artifact.exists()
        ), "the invalidation published after Redis returned did not reach the worker"
        assert key_of_sha not in worker.engine.host_adapter_keys()


def test_deleted_adapter_is_refused_by_a_worker_without_hints_once_its_cached_answer_expires(
    system, spare_worker, tmp_path
):
    """Without hints the TTL is the fallback: a NOT_FOUND refuses the adapter, and drops nothing else. It
    cannot: the name is only this tenant's view, the content may be another's (content-addressed), so
    the slot and the disk copy are left to the caches' own eviction (hints drop them when they arrive)."""
    tenant, _, key = system.new_tenant(admin=True)
    sha = _push_variant(system, tmp_path, "doomed", tenant, alpha=12)
    with Client(f"127.0.0.1:{spare_worker.port}", key) as client:
        assert client.complete("hello", adapter="doomed", max_tokens=2)
        assert system.private_cache_key(tenant, sha) in spare_worker.engine.resident_adapter_keys()
        system.admin.delete("doomed", tenant)
        time.sleep(0.5)  # past the worker's authorisation cache (0.3 s); this worker has no hints
        for _ in range(2):
            with pytest.raises(errors.NotFound):
                client.complete("hello", adapter="doomed", max_tokens=2)


def test_keep_warm_set_in_the_registry_reaches_the_engine(system, spare_worker, tmp_path):
    tenant, _, key = system.new_tenant(admin=True)
    warm = _push_variant(system, tmp_path, "warm", tenant, alpha=14)
    plain = _push_variant(system, tmp_path, "plain", tenant, alpha=15)
    with system.control_plane.app.sessions.begin() as s:
        s.execute(update(Adapter).where(Adapter.sha256 == warm).values(keep_warm=True))
    cache = spare_worker.engine.engine.adapter_cache
    with Client(f"127.0.0.1:{spare_worker.port}", key) as client:
        assert client.complete("hello", adapter="warm", max_tokens=2)
        assert client.complete("hello", adapter="plain", max_tokens=2)
    assert _wait_for(lambda: cache.is_keep_warm(system.private_cache_key(tenant, warm)))
    assert not cache.is_keep_warm(system.private_cache_key(tenant, plain))


def test_keep_warm_turned_off_in_the_registry_unpins_the_content_once_no_name_asks_for_it(
    system, spare_worker, tmp_path
):
    """Keep-warm was only ever switched on: an owner who turned it off left the copy pinned in host memory
    until the worker restarted. Two names of the same content both ask; the content stays pinned while
    either does."""
    tenant, _, key = system.new_tenant(admin=True)
    sha = _push_variant(system, tmp_path, "first", tenant, alpha=13)
    assert system.admin.push(tmp_path / "first", "second", tenant, BASE_MODEL) == sha
    cache = spare_worker.engine.engine.adapter_cache
    content_key = system.private_cache_key(tenant, sha)

    def keep_warm(name: str, value: bool) -> None:
        with system.control_plane.app.sessions.begin() as s:
            s.execute(update(Adapter).where(Adapter.name == name).values(keep_warm=value))

    def call(name: str) -> None:
        time.sleep(AUTH_TTL_S * 2)  # past the worker's authorisation cache: the next call reads the row
        with Client(f"127.0.0.1:{spare_worker.port}", key) as client:
            assert client.complete("hello", adapter=name, max_tokens=2)

    keep_warm("first", True)
    keep_warm("second", True)
    call("first")
    call("second")
    assert _wait_for(lambda: cache.is_keep_warm(content_key))
    keep_warm("first", False)
    call("first")
    call("second")  # a command after first's: once it is applied, first's is too
    assert _wait_for(lambda: cache.is_keep_warm(content_key))
    keep_warm("second", False)
    call("second")
    assert _wait_for(lambda: not cache.is_keep_warm(content_key))


def test_keep_warm_switched_off_by_an_upload_unpins_the_copy_on_a_hinted_worker_without_a_call(
    system, hinted_worker, tmp_path
):
    """Re-uploading the same files without keep-warm published nothing: every worker that had loaded the
    adapter kept it pinned in host memory until someone called it there (or the worker restarted)."""
    from openlora.admin_client import AdminClient

    tenant, _, key = system.new_tenant(admin=True)
    src = tmp_path / "pinned"
    shutil.copytree(system.model_dir / "adapters" / "ad6", src)
    config = src / "adapter_config.json"
    config.write_text(config.read_text().replace('"lora_alpha": 16', '"lora_alpha": 12'))
    cache = hinted_worker.engine.engine.adapter_cache
    with AdminClient(system.control_plane.target, key) as admin:
        sha = admin.upload_adapter(src, "pinned", BASE_MODEL, keep_warm=True).adapter.sha256
        content_key = system.private_cache_key(tenant, sha)
        with Client(f"127.0.0.1:{hinted_worker.port}", key) as client:
            assert client.complete("hello", adapter="pinned", max_tokens=2)
        assert _wait_for(lambda: cache.is_keep_warm(content_key))
        admin.upload_adapter(src, "pinned", BASE_MODEL, keep_warm=False)  # same files, no longer warm
    assert _wait_for(lambda: not cache.is_keep_warm(content_key))


def _local_fetcher(sources: dict[str, Path]):
    """Streams an artifact's files from a local directory, chunked as FetchArtifact sends them."""
    from openlora.artifact import ARTIFACT_FILES
    from openlora.v1 import worker_pb2

    async def fetch(sha256: str):
        for name in sorted(ARTIFACT_FILES):
            data = (sources[sha256] / name).read_bytes()
            for offset in range(0, len(data), 4096):
                yield worker_pb2.FetchArtifactResponse(
                    filename=name, offset=offset, data=data[offset : offset + 4096], file_size_bytes=len(data)
                )

    return fetch


def test_disk_budget_removes_unserved_artifacts_first_but_never_one_in_use(system, tmp_path):
    from data_plane.server.artifact_store import ArtifactStore
    from openlora.artifact import ARTIFACT_FILES

    names = ("ad1", "ad2", "ad3")
    shas = [system.adapters[n] for n in names]
    sources = {sha: system.model_dir / "adapters" / n for sha, n in zip(shas, names, strict=True)}
    one_fits = max(sum((src / f).stat().st_size for f in ARTIFACT_FILES) for src in sources.values())
    loading: set[str] = set()
    store = ArtifactStore(
        tmp_path / "artifacts",
        _local_fetcher(sources),
        None,
        64,
        1 << 30,
        max_disk_bytes=one_fits,
        busy=loading.__contains__,
    )
    held, busy, newest = shas

    async def run() -> None:
        await store.ensure(held, hold=True)  # a stream uses it
        await store.ensure(busy)
        loading.add(busy)  # the engine is reading it
        await store.ensure(newest)  # three over a budget of one: neither the held nor the busy one goes
        assert store.contains(held) and store.contains(busy) and store.contains(newest)
        loading.clear()
        # The stream ended: artifacts never served go first (least recently used first) until one fits;
        # the one just served stays.
        store.release([held])
        assert store.contains(held) and not store.contains(busy) and not store.contains(newest)

    asyncio.run(run())
    assert store.used_bytes <= one_fits


def test_worker_over_its_disk_budget_serves_and_keeps_no_unused_artifact(system, make_worker):
    worker = make_worker(None, disk_cache_bytes=1)  # every artifact is over budget: only use keeps one
    _, _, key = system.new_tenant()
    with Client(f"127.0.0.1:{worker.port}", key) as client:
        for name in ("ad1", "ad2", "ad1"):
            assert len(client.complete("hello", adapter=name, max_tokens=3)) > 0
    artifacts = worker.config.artifacts_dir
    assert _wait_for(lambda: not any(p.name in system.adapters.values() for p in artifacts.iterdir()))
