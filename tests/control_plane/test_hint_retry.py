"""Invalidate and revoke hints that Redis did not take are published as soon as it takes them again
(they were dropped: a worker served a replaced adapter's old weights, or a deleted private adapter, until
its cached answer expired, up to ten minutes with the control plane unreachable too); prewarm hints, mere
advice, are still dropped. The Redis is real; its outage is a client whose writes fail for a while."""

from __future__ import annotations

import threading
import time

import redis

from control_plane.hints import publisher as publisher_module
from control_plane.hints.publisher import HintPublisher
from openlora.hints import HINTS_STREAM, Hint


def _hints_since(client: redis.Redis, start_id: str) -> list[dict]:
    return [
        {k.decode(): v.decode() for k, v in fields.items()}
        for _, fields in client.xrange(HINTS_STREAM, min=f"({start_id}")
    ]


def _last_id(client: redis.Redis) -> str:
    entries = client.xrevrange(HINTS_STREAM, count=1)
    return entries[0][0].decode() if entries else "0-0"


class _Outage:
    """Makes the publisher's XADDs fail until `end()`."""

    def __init__(self, publisher: HintPublisher, monkeypatch) -> None:
        self.down = True
        real = publisher._client.xadd

        def xadd(*args, **kwargs):
            if self.down:
                raise redis.ConnectionError("Connection refused")
            return real(*args, **kwargs)

        monkeypatch.setattr(publisher._client, "xadd", xadd)

    def end(self) -> None:
        self.down = False


def test_invalidate_and_revoke_hints_wait_for_redis_in_order_and_prewarms_are_dropped(redis_url, monkeypatch):
    monkeypatch.setattr(publisher_module, "RETRY_INTERVAL_S", 0.1)
    reader = redis.Redis.from_url(redis_url)
    start = _last_id(reader)
    publisher = HintPublisher(redis_url)
    outage = _Outage(publisher, monkeypatch)
    try:
        assert publisher.invalidate("adapter-1", source_sha256="a" * 64) is False
        assert publisher.publish(Hint(kind="prewarm", adapter_id="adapter-2", sha256="b" * 64)) is False
        assert publisher.revoke("key-3") is False
        assert publisher.num_pending == 2
        time.sleep(0.5)
        assert _hints_since(reader, start) == []  # still down: nothing, and nothing lost
        outage.end()
        deadline = time.monotonic() + 10
        while publisher.num_pending and time.monotonic() < deadline:
            time.sleep(0.05)
        hints = _hints_since(reader, start)
        assert [(h["kind"], h.get("adapter_id") or h.get("api_key_id")) for h in hints] == [
            ("invalidate", "adapter-1"),
            ("revoke", "key-3"),
        ]
        # once Redis is back, a new hint goes out at once, after nothing
        assert publisher.invalidate("adapter-4") is True
        assert _hints_since(reader, start)[-1]["adapter_id"] == "adapter-4"
    finally:
        publisher.close()
        reader.close()


def test_a_hint_published_while_earlier_ones_wait_queues_behind_them_without_waiting(redis_url, monkeypatch):
    """A call that publishes while kept hints wait never waits on Redis itself (the calls would run one at
    a time behind each other's timeouts): it queues, and the retry thread publishes the queue in order."""
    monkeypatch.setattr(publisher_module, "RETRY_INTERVAL_S", 0.1)
    reader = redis.Redis.from_url(redis_url)
    start = _last_id(reader)
    publisher = HintPublisher(redis_url)
    outage = _Outage(publisher, monkeypatch)
    calls_while_queued = []
    try:
        assert publisher.invalidate("first") is False
        real_xadd = publisher._client.xadd
        caller = threading.get_ident()

        def recorded(*args, **kwargs):
            if threading.get_ident() == caller:  # the retry thread's own calls do not count
                calls_while_queued.append(args)
            return real_xadd(*args, **kwargs)

        monkeypatch.setattr(publisher._client, "xadd", recorded)
        assert publisher.invalidate("second") is False  # queued behind "first"
        assert calls_while_queued == []  # without a Redis call of its own
        outage.end()
        deadline = time.monotonic() + 10
        while publisher.num_pending and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [h["adapter_id"] for h in _hints_since(reader, start)] == ["first", "second"]
    finally:
        publisher.close()
        reader.close()


def test_the_retry_thread_survives_an_unexpected_error(redis_url, monkeypatch):
    monkeypatch.setattr(publisher_module, "RETRY_INTERVAL_S", 0.1)
    reader = redis.Redis.from_url(redis_url)
    start = _last_id(reader)
    publisher = HintPublisher(redis_url)
    real_xadd = publisher._client.xadd
    failures = iter([redis.ConnectionError("refused"), ValueError("a bug"), redis.TimeoutError("slow")])

    def flaky(*args, **kwargs):
        error = next(failures, None)
        if error is not None:
            raise error
        return real_xadd(*args, **kwargs)

    monkeypatch.setattr(publisher._client, "xadd", flaky)
    try:
        assert publisher.revoke("key-9") is False
        deadline = time.monotonic() + 10
        while publisher.num_pending and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [h["api_key_id"] for h in _hints_since(reader, start)] == ["key-9"]
    finally:
        publisher.close()
        reader.close()


def test_a_revocation_redis_never_took_is_published_by_the_next_start(
    database_url, redis_url, tmp_path, server_thread
):
    """A revoke hint waits for Redis in the control plane's memory only: a control plane stopped (a crash,
    SIGTERM) before Redis took it lost it, and the streams of the revoked key ran on to their end after
    Redis was back. The next start publishes the recent revocations again."""
    from control_plane.server.server import serve
    from openlora.admin_client import AdminClient

    from .conftest import make_config

    reader = redis.Redis.from_url(redis_url)
    start = _last_id(reader)
    unreachable = "redis://127.0.0.1:1/0"  # nothing listens there: every XADD fails
    running = server_thread.run(serve(make_config(database_url, tmp_path, unreachable)))
    try:
        with AdminClient(running.target, running.admin_key) as admin:
            admin.create_tenant("acme")
            key_id = admin.create_api_key("acme").key.id
            admin.revoke_api_key(key_id)
        assert running.app.publisher.num_pending == 1
    finally:
        server_thread.run(running.stop(0))
    assert _hints_since(reader, start) == []
    running = server_thread.run(serve(make_config(database_url, tmp_path, redis_url)))
    try:
        revoked = [h.get("api_key_id") for h in _hints_since(reader, start) if h["kind"] == "revoke"]
        assert revoked == [key_id]
    finally:
        server_thread.run(running.stop(0))
        reader.close()
