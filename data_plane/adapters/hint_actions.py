"""What a worker does with a hint from `openlora:hints`, and its residency heartbeat in Redis.

Wiring (in the worker): call `await apply_hint(engine, hint, artifacts)` for every hint the listener
reads, and run `publish_residency(...)` as a task beside the hint listener.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

from data_plane.engine.request import AdapterRef
from openlora.hints import Hint

log = logging.getLogger(__name__)

NEAR_DEADLINE_S = 2.0  # a prewarm due sooner than this goes into a free device slot, not only host memory
RESIDENCY_KEY_PREFIX = "openlora:worker:"


async def apply_hint(engine, hint: Hint, artifacts, near_deadline_s: float = NEAR_DEADLINE_S) -> None:
    """Acts on one hint. `engine`: AsyncEngine, ProcessEngine or LLMEngine (each has the thread-safe cache
    commands called here); `artifacts`: the worker's ArtifactStore
    (prewarm brings the artifact to local disk first, from the control plane if needed, and then, unless
    the hint asks for the disk tier only, has the engine prefetch it into host memory or a slot; the
    engine declines what the tier could not keep until the predicted call)."""
    if hint.kind == "invalidate" and hint.key_only:  # this one cache key is no longer served
        engine.invalidate(hint.cache_key)
        return
    if hint.kind == "invalidate":  # no adapter serves this content any more, in any cache scope
        engine.invalidate_content(hint.sha256)
        return
    key = hint.cache_key  # the key the adapter's requests use: its content, scoped when private
    if hint.kind == "demote":
        engine.demote(key)
        return
    log.debug(
        "prewarm hint key=%s tier=%s reason=%s deadline_in_s=%s",
        key[:12],
        hint.tier,
        hint.reason or "unknown",
        "none" if hint.deadline_at is None else f"{hint.deadline_at - time.time():.3f}",
    )
    local = await artifacts.ensure(key)  # local disk first, whatever tier is asked: it can keep it
    if hint.tier == "disk":
        return
    deadline_in_s = None if hint.deadline_at is None else hint.deadline_at - time.time()
    to_device = hint.tier == "gpu" or (deadline_in_s is not None and deadline_in_s <= near_deadline_s)
    deadline_mono = None if deadline_in_s is None else time.monotonic() + deadline_in_s
    engine.prefetch(
        key,
        (AdapterRef(key=key, path=local.path),),
        to_device=to_device,
        deadline_at=deadline_mono,
        protect=hint.protects,
    )


def residency_key(worker_id: str) -> str:
    return f"{RESIDENCY_KEY_PREFIX}{worker_id}"


async def publish_residency(
    redis_url: str,
    worker_id: str,
    stats: Callable[[], tuple[int, int, list[str], list[str]]],
    interval_s: float = 2.0,
    ttl_s: float = 10.0,
) -> None:
    """Every `interval_s`, writes the hash `openlora:worker:<id>` (device_adapters, host_adapters as JSON
    lists of sha256, running, waiting, at) with a TTL of `ttl_s`, so routing can prefer a worker that holds
    an adapter. `stats()` -> (running, waiting, device keys, host keys). Redis down: skipped, retried."""
    import redis.asyncio as redis

    client = redis.from_url(redis_url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        while True:
            running, waiting, device_keys, host_keys = stats()
            fields = {
                "device_adapters": json.dumps(sorted(device_keys)),
                "host_adapters": json.dumps(sorted(host_keys)),
                "running": running,
                "waiting": waiting,
                "at": repr(time.time()),
            }
            try:
                key = residency_key(worker_id)
                async with client.pipeline(transaction=True) as pipe:
                    await pipe.hset(key, mapping=fields).pexpire(key, int(ttl_s * 1000)).execute()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # advisory
                log.debug("residency heartbeat not published: %s", error)
            await asyncio.sleep(interval_s)
    finally:
        await client.aclose()
