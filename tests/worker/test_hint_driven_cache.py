"""The authorisation cache under a long TTL (10 s at both ends): what cuts it short is the control
plane's hints, per adapter id and per key, and nothing one tenant asks for.

- A tenant naming another tenant's private adapter gets NOT_FOUND and evicts nothing of the owner's.
- Deleting one of two adapters that share content (same sha256) leaves the other's content served.
- A revoked key is refused within a second, long before the TTL.
- The cache is bounded in entries.
"""

from __future__ import annotations

import shutil
import time
import uuid

import pytest
from worker_test_support import Admin, LoopThread

from openlora import errors
from openlora.client import Client
from openlora.v1 import inference_pb2

from .conftest import ADMIN_KEY, BASE_MODEL, WORKER_TOKEN, System, start_worker

LONG_TTL_S = 10.0
PROMPT = "hello world"


@pytest.fixture(scope="module")
def long_cache(database_url, redis_url, tiny_model_dir, tmp_path_factory):
    """A control plane and a worker that both let an answer be cached for 10 s, with Redis hints."""
    from control_plane.config import ControlPlaneConfig
    from control_plane.server.server import serve

    loop = LoopThread()
    cp_state = tmp_path_factory.mktemp("cp-long-cache")
    cp = loop.run(
        serve(
            ControlPlaneConfig(
                database_url=database_url,
                state_dir=cp_state,
                worker_token=WORKER_TOKEN,
                listen="127.0.0.1:0",
                redis_url=redis_url,
                admin_key=ADMIN_KEY,
                authorize_cache_ttl_ms=int(LONG_TTL_S * 1000),
                predictor_interval_s=0,
            )
        )
    )
    worker = start_worker(
        loop,
        cp.target,
        tiny_model_dir,
        tmp_path_factory.mktemp("worker-long-cache"),
        redis_url,
        auth_cache_ttl_s=LONG_TTL_S,
    )
    admin = Admin(cp.target, ADMIN_KEY)
    yield System(loop, cp, worker, admin, tiny_model_dir, cp_state)
    admin.close()
    loop.run(worker.stop(1.0))
    loop.run(cp.stop(1.0))
    loop.close()


def _private_adapter(system: System, tmp_path, alpha: int) -> object:
    """A copy of a fixture adapter with its own content (a distinct lora_alpha: a distinct sha256)."""
    src = tmp_path / f"alpha-{alpha}-{uuid.uuid4().hex[:6]}"
    shutil.copytree(system.model_dir / "adapters" / "ad6", src)
    config = src / "adapter_config.json"
    config.write_text(config.read_text().replace('"lora_alpha": 16', f'"lora_alpha": {alpha}'))
    return src


def _last(client: Client, **kwargs) -> inference_pb2.GenerateResponse:
    return list(client.generate_stream(prompt=PROMPT, max_tokens=2, **kwargs))[-1]


def test_naming_another_tenants_adapter_evicts_nothing_of_the_owners(long_cache, tmp_path):
    system = long_cache
    owner, _, owner_key = system.new_tenant(admin=True)
    _, _, stranger_key = system.new_tenant()
    sha = system.admin.push(_private_adapter(system, tmp_path, 11), "secret", owner, BASE_MODEL)
    artifact = system.worker.config.artifacts_dir / system.private_cache_key(owner, sha)
    with Client(system.target, owner_key) as owner_client, Client(system.target, stranger_key) as stranger:
        _last(owner_client, adapter="secret")
        assert _last(owner_client, adapter="secret").timing.cache_tier == inference_pb2.CACHE_TIER_DEVICE
        with pytest.raises(errors.NotFound):
            stranger.complete(PROMPT, adapter="secret", max_tokens=2)
        # The owner's artifact and device slot are both still there.
        assert artifact.is_dir()
        assert _last(owner_client, adapter="secret").timing.cache_tier == inference_pb2.CACHE_TIER_DEVICE


def test_deleting_one_of_two_adapters_sharing_content_keeps_the_others_served(long_cache, tmp_path):
    system = long_cache
    first, _, first_key = system.new_tenant(admin=True)
    second, _, second_key = system.new_tenant(admin=True)
    content = _private_adapter(system, tmp_path, 12)
    sha = system.admin.push(content, "twin", first, BASE_MODEL)
    assert system.admin.push(content, "twin", second, BASE_MODEL) == sha
    # Private content is cached per owner: the second tenant's copy is its own, and must stay.
    artifact = system.worker.config.artifacts_dir / system.private_cache_key(second, sha)
    with Client(system.target, first_key) as first_client, Client(system.target, second_key) as second_client:
        _last(first_client, adapter="twin")
        _last(second_client, adapter="twin")
        system.admin.delete("twin", first)
        deadline = time.monotonic() + 3  # the hint arrives within a second; the cache TTL is 10 s
        while time.monotonic() < deadline:
            try:
                first_client.complete(PROMPT, adapter="twin", max_tokens=2)
            except errors.NotFound:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the deleted adapter was still served from the cache")
        assert artifact.is_dir()
        assert _last(second_client, adapter="twin").timing.cache_tier == inference_pb2.CACHE_TIER_DEVICE


def test_revoked_key_is_refused_within_a_second_not_after_the_ttl(long_cache):
    system = long_cache
    _, key_id, key = system.new_tenant()
    with Client(system.target, key) as client:
        assert client.complete(PROMPT, max_tokens=2)
        system.admin.revoke_key(key_id)
        revoked_at = time.monotonic()
        while time.monotonic() - revoked_at < 3:  # well inside the 10 s TTL
            try:
                client.complete(PROMPT, max_tokens=2)
            except errors.Unauthenticated:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the revoked key was still served from the cache")


def test_authorisation_cache_is_bounded_in_entries(long_cache):
    from data_plane.server.control_plane_client import ControlPlaneClient

    system = long_cache
    keys = [system.new_tenant()[2] for _ in range(6)]

    async def fill() -> int:
        client = ControlPlaneClient(
            system.control_plane.target, WORKER_TOKEN, auth_cache_ttl_s=LONG_TTL_S, auth_cache_max_entries=3
        )
        try:
            for key in keys:
                await client.authorize(key, (), BASE_MODEL)
            return client.num_cached_answers
        finally:
            await client.close()

    assert system.loop.run(fill()) == 3
