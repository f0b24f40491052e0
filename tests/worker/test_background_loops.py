"""The worker's background loops (heartbeat, hint listener, residency publisher) survive any exception:
logged, counted, and the loop goes on."""

from __future__ import annotations

import asyncio
import uuid

import redis

from control_plane.hints.publisher import HintPublisher
from data_plane.adapters.hint_actions import publish_residency, residency_key
from data_plane.server.background import keep_running
from data_plane.server.control_plane_client import ControlPlaneClient
from data_plane.server.hint_listener import listen_for_hints
from openlora.hints import Hint

from .conftest import WORKER_TOKEN, support


class _Flaky:
    """A stats() that raises like an unguarded read of engine state from another thread, `failures` times."""

    def __init__(self, failures: int, value) -> None:
        self.failures = failures
        self.value = value
        self.calls = 0
        self.served = asyncio.Event()

    def __call__(self):
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError("dictionary changed size during iteration")
        self.served.set()
        return self.value


def test_heartbeat_loop_survives_a_failing_stats_read(system):
    async def scenario() -> tuple[int, int]:
        client = ControlPlaneClient(system.control_plane.target, WORKER_TOKEN)
        stats = _Flaky(2, (0, 0, []))
        errors = []

        async def reregister() -> None:
            return None

        task = asyncio.get_running_loop().create_task(
            client.run_heartbeats(
                system.worker.worker_id,
                0.05,
                stats,
                reregister,
                on_error=lambda: errors.append(1),
                instance_id=system.worker.instance_id,
            )
        )
        try:
            await asyncio.wait_for(stats.served.wait(), 20)
            assert not task.done()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await client.close()
        return stats.calls, len(errors)

    calls, num_errors = system.loop.run(scenario())
    assert calls >= 3 and num_errors == 2


def test_hint_listener_survives_a_hint_whose_handling_raises(redis_url):
    adapter_ids = [f"loop-{uuid.uuid4().hex}" for _ in range(2)]

    async def scenario() -> list[str]:
        seen: list[str] = []
        got_second = asyncio.Event()

        def on_hint(hint: Hint) -> None:
            if hint.adapter_id not in adapter_ids:
                return  # another test's hint on the shared stream
            seen.append(hint.adapter_id)
            if hint.adapter_id == adapter_ids[0]:
                raise KeyError("engine state changed under the hint")
            got_second.set()

        task = asyncio.get_running_loop().create_task(listen_for_hints(redis_url, on_hint))
        publisher = HintPublisher(redis_url)
        try:
            await asyncio.sleep(0.3)  # the listener reads from the stream's newest entry on
            for adapter_id in adapter_ids:
                await asyncio.to_thread(publisher.invalidate, adapter_id)
            await asyncio.wait_for(got_second.wait(), 10)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            publisher.close()
        return seen

    assert asyncio.run(scenario()) == adapter_ids


def test_residency_publisher_is_started_again_after_it_dies(redis_url):
    worker_id = f"loop-{uuid.uuid4().hex}"

    async def scenario() -> int:
        stats = _Flaky(1, (0, 0, ["a" * 64], []))
        restarts = []
        task = asyncio.get_running_loop().create_task(
            keep_running(
                "residency",
                lambda: publish_residency(redis_url, worker_id, stats, interval_s=0.05),
                lambda: restarts.append(1),
                restart_min_s=0.05,
            )
        )
        try:
            await asyncio.wait_for(stats.served.wait(), 10)
            client = redis.asyncio.from_url(redis_url)
            try:
                for _ in range(100):
                    if await client.exists(residency_key(worker_id)):
                        break
                    await asyncio.sleep(0.05)
                return len(restarts) if await client.exists(residency_key(worker_id)) else -1
            finally:
                await client.delete(residency_key(worker_id))
                await client.aclose()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    assert asyncio.run(scenario()) == 1


def test_hint_listener_warns_once_when_redis_cannot_be_reached(caplog, monkeypatch):
    """A worker on an unreachable Redis served without hints and said so only at debug level."""
    import logging

    from data_plane.server import hint_listener

    monkeypatch.setattr(hint_listener, "RETRY_S", 0.05)

    async def scenario() -> None:
        task = asyncio.get_running_loop().create_task(
            listen_for_hints("redis://127.0.0.1:1/0", lambda hint: None)
        )
        await asyncio.sleep(0.6)  # several failed attempts
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    with caplog.at_level(logging.DEBUG, logger="data_plane.server.hint_listener"):
        asyncio.run(scenario())
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "prewarm hints unavailable" in warnings[0].getMessage()
    assert sum(1 for r in caplog.records if "hint stream unavailable" in r.getMessage()) >= 2


def test_hint_listener_down_at_start_reads_the_hints_published_since_whatever_the_workers_clock(
    monkeypatch, tmp_path
):
    """A listener that found Redis down at start read on from its start by the worker's wall clock, but
    Redis makes entry ids by its own: with the worker's clock a day ahead (or stepped forward), every hint
    of the next day (invalidations, revocations) was skipped. The start is placed on Redis's clock."""
    import time

    from data_plane.server import hint_listener

    monkeypatch.setattr(hint_listener, "RETRY_S", 0.05)
    real_time = time.time
    monkeypatch.setattr(hint_listener.time, "time", lambda: real_time() + 86_400.0)  # a day ahead
    adapter_id = f"ahead-{uuid.uuid4().hex}"

    async def scenario(port: int) -> list[str]:
        url = f"redis://127.0.0.1:{port}/0"
        seen: list[str] = []
        got = asyncio.Event()

        def on_hint(hint: Hint) -> None:
            seen.append(hint.adapter_id)
            got.set()

        task = asyncio.get_running_loop().create_task(listen_for_hints(url, on_hint))
        server = None
        publisher = None
        try:
            await asyncio.sleep(0.3)  # refused: nothing listens on the port yet
            server, _ = await asyncio.to_thread(support.start_redis, tmp_path, port)
            publisher = HintPublisher(url)
            await asyncio.to_thread(publisher.invalidate, adapter_id)
            await asyncio.wait_for(got.wait(), 10)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            if publisher is not None:
                publisher.close()
            if server is not None:
                server.kill()
                server.wait()
        return seen

    # Redis starts on the port the listener was given: when that port, picked free, was taken by then,
    # the whole scenario runs again on another.
    assert support.retry_on_taken_port(lambda: asyncio.run(scenario(support.free_port()))) == [adapter_id]
