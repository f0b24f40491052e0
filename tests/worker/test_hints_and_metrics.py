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
