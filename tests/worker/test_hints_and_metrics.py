"""Invalidation hints cut the authorisation cache short; the Prometheus endpoint serves the worker's metrics."""

from __future__ import annotations

import shutil
import time
import urllib.request

import pytest

from openlora import errors
from openlora.client import Client


def test_invalidation_hint_refuses_a_deleted_adapter_before_the_cache_ttl(system, hinted_worker, tmp_path):
    tenant, _, key = system.new_tenant(admin=True)
    src = tmp_path / "hinted"
    shutil.copytree(system.model_dir / "adapters" / "ad6", src)
    config = src / "adapter_config.json"
    config.write_text(config.read_text().replace('"lora_alpha": 16', '"lora_alpha": 13'))
    sha = system.admin.push(src, "hinted", tenant, "tiny")
    target = f"127.0.0.1:{hinted_worker.port}"
    artifact = hinted_worker.config.artifacts_dir / system.private_cache_key(tenant, sha)
    with Client(target, key) as client:
        assert client.complete("hello", adapter="hinted", max_tokens=2)
        assert artifact.is_dir()
        system.admin.delete("hinted", tenant)
        deadline = time.monotonic() + 5  # well inside the 10 s cache TTL
        while artifact.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not artifact.exists(), "the invalidation hint was not acted on"
        with pytest.raises(errors.NotFound):
            client.complete("hello", adapter="hinted", max_tokens=2)


def test_metrics_endpoint_exposes_latency_histograms_without_tenant_labels(system, hinted_worker):
    _, _, key = system.new_tenant()
    with Client(f"127.0.0.1:{hinted_worker.port}", key) as client:
        client.complete("hello", adapter="ad7", max_tokens=3)
    url = f"http://127.0.0.1:{hinted_worker.config.metrics_port}/metrics"
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    for name in (
        "openlora_ttft_seconds_bucket",
        "openlora_inter_token_seconds_bucket",
        "openlora_queue_seconds_bucket",
        "openlora_e2e_latency_seconds_bucket",
        "openlora_running_requests",
        "openlora_waiting_requests",
        "openlora_adapter_load_seconds_bucket",
        "openlora_adapter_cache_lookups_total",
        "openlora_tokens_generated_total",
        # The engine's prefetch accounting, one sample per tier / reason even before any prefetch.
        'openlora_prefetch_total{tier="host"}',
        'openlora_prefetch_wasted_total{tier="device"}',
        'openlora_prefetch_skipped_total{reason="no_room"}',
    ):
        assert name in body, name
    assert "tenant" not in body and "adapter=" not in body


def test_revoking_a_key_ends_its_running_streams_billed_for_what_they_delivered(system, hinted_worker):
    """A revoked key's running streams went on to their end (only new calls were refused): they end with
    UNAUTHENTICATED once the revocation hint arrives, billed for the tokens delivered; a stream of another
    key of the same tenant goes on."""
    from tests.openai.conftest import EnginePause

    tenant, key_id, key = system.new_tenant()
    _, other_key = system.admin.create_key(tenant)
    target = f"127.0.0.1:{hinted_worker.port}"
    pause = EnginePause(hinted_worker)
    try:
        with Client(target, key) as client, Client(target, other_key) as other_client:
            stream = client.generate_stream(prompt="hello", adapter="ad7", max_tokens=200)
            other = other_client.generate_stream(prompt="hello", adapter="ad7", max_tokens=200)
            first, other_first = next(stream), next(other)
            pause.pause()  # both run on: no token is made until the revocation has arrived
            assert first.token_ids and other_first.token_ids
            system.admin.revoke_key(key_id)
            deadline = time.monotonic() + 5
            while hinted_worker.control_plane.knows_key(key) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not hinted_worker.control_plane.knows_key(key), "the revocation hint did not arrive"
            pause.resume()
            received = len(first.token_ids)
            with pytest.raises(errors.Unauthenticated, match="revoked"):
                for response in stream:
                    received += len(response.token_ids)
            other_tokens = len(other_first.token_ids) + sum(len(r.token_ids) for r in other)
    finally:
        pause.restore()
    assert received < 200 and other_tokens == 200
    system.loop.run(hinted_worker.usage.flush())
    usage = system.wait_usage(tenant, 2)
    assert usage.total_requests == 2
    assert usage.total_completion_tokens == received + 200


def test_deleting_content_another_tenant_holds_leaves_no_warm_copy_for_the_deleter(
    system, hinted_worker, tmp_path
):
    """Promise: uploading the same bytes as another tenant's private adapter tells nothing. A delete (or
    replacement) whose content another tenant still holds named no content, so the deleter's own copy
    stayed on the worker (disk, slot): uploading the same bytes again, it found them warm, and a control
    upload of bytes nobody holds came back cold. Its delete drops its own copy alone; the holder's stays."""
    from openlora.v1 import inference_pb2

    src = tmp_path / "held"
    shutil.copytree(system.model_dir / "adapters" / "ad5", src)
    config = src / "adapter_config.json"
    config.write_text(config.read_text().replace('"lora_alpha": 16', '"lora_alpha": 27'))
    holder, _, holder_key = system.new_tenant(admin=True)
    prober, _, prober_key = system.new_tenant(admin=True)
    sha = system.admin.push(src, "held", holder, "tiny")
    assert system.admin.push(src, "probe", prober, "tiny") == sha
    target = f"127.0.0.1:{hinted_worker.port}"
    artifacts = hinted_worker.config.artifacts_dir
    holder_copy = artifacts / system.private_cache_key(holder, sha)
    prober_copy = artifacts / system.private_cache_key(prober, sha)

    def tier(client: Client, adapter: str) -> int:
        return list(client.generate_stream("hello", adapter=adapter, max_tokens=2))[-1].timing.cache_tier

    with Client(target, holder_key) as owner, Client(target, prober_key) as probe:
        assert tier(owner, "held") == inference_pb2.CACHE_TIER_REMOTE
        assert tier(probe, "probe") == inference_pb2.CACHE_TIER_REMOTE
        assert holder_copy.is_dir() and prober_copy.is_dir()
        system.admin.delete("probe", prober)
        deadline = time.monotonic() + 5
        while prober_copy.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not prober_copy.exists(), "the deleter's own copy of content another tenant holds was kept"
        assert system.admin.push(src, "probe", prober, "tiny") == sha
        assert tier(probe, "probe") == inference_pb2.CACHE_TIER_REMOTE
        # A replacement of that content by other bytes drops the replaced copy the same way.
        system.admin.push(system.model_dir / "adapters" / "ad6", "probe", prober, "tiny")
        deadline = time.monotonic() + 5
        while prober_copy.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not prober_copy.exists(), "the replaced copy of content another tenant holds was kept"
        # The holder's copy was never disturbed.
        assert holder_copy.is_dir()
        assert tier(owner, "held") == inference_pb2.CACHE_TIER_DEVICE


def test_revoking_a_key_ends_its_calls_still_preparing(system, hinted_worker, monkeypatch):
    """A call authorized before the revocation but still preparing when its hint arrived (tokenizing,
    fetching its adapter, building a merge: seconds for a large adapter) was not among the key's streams:
    it streamed to its end. It ends UNAUTHENTICATED as it reaches the engine, having delivered nothing."""
    import asyncio
    import threading

    from data_plane.server.generation import GenerationService

    _, key_id, key = system.new_tenant()
    entered, go = threading.Event(), threading.Event()
    prepare = GenerationService._prepare

    async def slow_prepare(self, *args, **kwargs):
        entered.set()
        while not go.is_set():
            await asyncio.sleep(0.01)
        return await prepare(self, *args, **kwargs)

    monkeypatch.setattr(GenerationService, "_prepare", slow_prepare)
    _assert_revoked_while_held(system, hinted_worker, key_id, key, entered, go)


def test_revoking_a_key_ends_a_call_whose_authorization_was_answered_before_it(
    system, hinted_worker, monkeypatch
):
    """An Authorize answered before the revocation committed may reach the worker after the revocation
    hint (a control plane under load answers in seconds): the call it starts was in none of the key's
    streams when the hint ended them, and streamed to its end on a revoked key. It ends UNAUTHENTICATED
    before the engine, having delivered nothing."""
    import asyncio
    import threading

    from data_plane.server.generation import GenerationService

    _, key_id, key = system.new_tenant()
    answered, go = threading.Event(), threading.Event()
    authorize = GenerationService.authorize

    async def late_answer(self, api_key, names):
        auth = await authorize(self, api_key, names)
        if names:  # the call's own Authorize, answered before the revocation: it arrives after the hint
            answered.set()
            while not go.is_set():
                await asyncio.sleep(0.01)
        return auth

    monkeypatch.setattr(GenerationService, "authorize", late_answer)
    _assert_revoked_while_held(system, hinted_worker, key_id, key, answered, go)


def _assert_revoked_while_held(system, hinted_worker, key_id, key, reached, go) -> None:
    """Calls with `key` on a thread; once the call is `reached` (an Event the test sets where it holds the
    call), revokes the key and waits for the hint to arrive, then lets the call go on (`go`): it must end
    UNAUTHENTICATED naming the revocation."""
    import threading

    result: dict = {}

    def call() -> None:
        with Client(f"127.0.0.1:{hinted_worker.port}", key) as client:
            try:
                result["tokens"] = sum(
                    len(r.token_ids) for r in client.generate_stream("hello", adapter="ad7", max_tokens=50)
                )
            except errors.OpenLoRAError as error:
                result["error"] = error

    caller = threading.Thread(target=call)
    caller.start()
    try:
        assert reached.wait(10)
        system.admin.revoke_key(key_id)
        deadline = time.monotonic() + 5
        while hinted_worker.control_plane.knows_key(key) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not hinted_worker.control_plane.knows_key(key), "the revocation hint did not arrive"
    finally:
        go.set()
        caller.join(30)
    assert isinstance(result.get("error"), errors.Unauthenticated), result
    assert "revoked" in str(result["error"])
