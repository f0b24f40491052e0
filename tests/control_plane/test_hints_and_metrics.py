"""Invalidation hints reach the Redis stream on delete and replace (and Redis being down fails nothing);
the Prometheus endpoint counts RPCs and usage events without tenant or adapter labels."""

from __future__ import annotations

import socket
import urllib.request

import redis

from control_plane.server.server import serve
from openlora.hints import HINTS_STREAM, Hint
from openlora.v1 import worker_pb2

from .conftest import ControlPlaneHandle, make_config, register_worker, support

BASE = "tiny-llama"


def _hints_for(redis_url: str, adapter_id: str) -> list[Hint]:
    client = redis.Redis.from_url(redis_url)
    try:
        entries = client.xrevrange(HINTS_STREAM, count=2000)
    finally:
        client.close()
    hints = [Hint.from_fields(fields) for _, fields in reversed(entries)]
    return [h for h in hints if h.adapter_id == adapter_id]


def test_hint_fields_round_trip() -> None:
    hint = Hint(kind="prewarm", adapter_id="a1", sha256="f" * 64, tier="gpu", deadline_at=1700000000.5)
    assert Hint.from_fields({k.encode(): v.encode() for k, v in hint.to_fields().items()}) == hint
    bare = Hint(kind="invalidate", adapter_id="a2", sha256="0" * 64)
    assert Hint.from_fields(bare.to_fields()) == bare


def test_delete_and_replace_publish_invalidations(cp, redis_url, adapters_root) -> None:
    with cp.admin() as admin:
        first = admin.upload_adapter(adapters_root / "a", name="hinted", base_model=BASE).adapter
        second = admin.upload_adapter(adapters_root / "b", name="hinted", base_model=BASE).adapter
        assert [(h.kind, h.sha256) for h in _hints_for(redis_url, first.id)] == [("invalidate", first.sha256)]
        admin.delete_adapter("hinted")
    hints = _hints_for(redis_url, first.id)
    assert [(h.kind, h.sha256) for h in hints] == [
        ("invalidate", first.sha256),
        ("invalidate", second.sha256),
    ]


def test_redis_down_never_fails_an_rpc(
    database_url, server_thread, tmp_path, adapters_root, base_spec
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    config = make_config(
        database_url, tmp_path, f"redis://127.0.0.1:{dead_port}/0", admin_key="operator-key-for-this-test"
    )
    running = server_thread.run(serve(config))
    try:
        handle = ControlPlaneHandle(running, config, "operator-key-for-this-test")
        register_worker(handle, base_spec)
        with handle.admin() as admin:
            admin.upload_adapter(adapters_root / "a", name="no-redis", base_model=BASE)
            admin.upload_adapter(adapters_root / "b", name="no-redis", base_model=BASE)
            assert admin.delete_adapter("no-redis").name == "no-redis"
    finally:
        server_thread.run(running.stop(0))


def test_metrics_endpoint_counts_rpcs_and_usage(database_url, server_thread, tmp_path) -> None:
    def start():
        """The control plane with /metrics on a port picked free (its ListenError when that was taken)."""
        config = make_config(
            database_url,
            tmp_path,
            None,
            admin_key="operator-key-for-metrics",
            metrics_port=support.free_port(),
        )
        return config, server_thread.run(serve(config))

    config, running = support.retry_on_taken_port(start)
    metrics_port = config.metrics_port
    try:
        handle = ControlPlaneHandle(running, config, "operator-key-for-metrics")
        with handle.admin() as admin:
            admin.create_tenant("metered")
        handle.worker_stub().ReportUsage(worker_pb2.ReportUsageRequest(), metadata=handle.worker_metadata())
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    finally:
        server_thread.run(running.stop(0))
    assert 'openlora_cp_rpc_requests_total{code="OK",method="CreateTenant"}' in body
    assert 'openlora_cp_rpc_duration_seconds_count{method="ReportUsage"}' in body
    assert "openlora_cp_usage_events_inserted_total" in body
    assert "openlora_cp_usage_events_duplicate_total" in body
    assert "tenant=" not in body and "adapter=" not in body
