"""Best-effort consumer of the control plane's `openlora:hints` Redis stream.

The listener hands every hint to its callback (the worker drops invalidated adapters from the
authorisation cache, the local disk and the engine, and prewarms or demotes through the engine). It
reads from the stream's last entry when it starts and then tracks the id of the last entry it read, so
a reconnect after Redis was down misses nothing still in the stream. Serving never depends on this: with
Redis down the listener retries quietly and the TTL still bounds how long a stale answer lives. A hint
whose handling raises is logged and skipped: the listener never dies of one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from openlora.hints import HINTS_STREAM, Hint

log = logging.getLogger(__name__)

RETRY_S = 2.0
BLOCK_MS = 1000


async def listen_for_hints(
    redis_url: str, on_hint: Callable[[Hint], None], on_error: Callable[[], None] | None = None
) -> None:
    """Reads new stream entries forever (from the moment it starts) and hands each hint to `on_hint`;
    `on_error` counts a hint whose handling raised (logged, then the next hint)."""
    import redis.asyncio as redis

    # Every Redis operation is bounded (a read blocks for BLOCK_MS at most, so its timeout is well past that).
    client = redis.from_url(redis_url, socket_connect_timeout=2.0, socket_timeout=BLOCK_MS / 1000 + 4.0)
    # Never "$" across reads: after a reconnect "$" would skip what was published while it was away.
    # None until the first contact, which reads on from the stream's newest entry.
    last_id: str | None = None
    started_at = time.monotonic()
    from_start = False  # down at the first contact: read on from the moment it started, once reachable
    this_task = asyncio.current_task()
    unreachable = False  # logged once per outage: a warning when it starts, a line when it ends
    try:
        while True:
            # redis-py may swallow a cancellation that lands inside a blocking XREAD; the task still
            # says it is being cancelled, so the listener stops instead of reading on forever.
            if this_task is not None and this_task.cancelling():
                raise asyncio.CancelledError
            try:
                if from_start:
                    last_id = await _entry_id_at(client, started_at)
                    from_start = False
                elif last_id is None:
                    newest = await client.xrevrange(HINTS_STREAM, count=1)
                    last_id = _text(newest[0][0]) if newest else "0-0"
                entries = await client.xread({HINTS_STREAM: last_id}, block=BLOCK_MS, count=100)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # Redis is advisory: wait and try again
                if not unreachable:
                    log.warning(
                        "prewarm hints unavailable (Redis: %s); serving without them, retrying every %gs",
                        error,
                        RETRY_S,
                    )
                    unreachable = True
                else:
                    log.debug("hint stream unavailable: %s", error)
                if last_id is None:  # down from the start: read what is published from then on
                    from_start = True
                await asyncio.sleep(RETRY_S)
                continue
            if unreachable:
                log.info("prewarm hints reachable again")
                unreachable = False
            for _stream, messages in entries or ():
                for entry_id, fields in messages:
                    last_id = _text(entry_id)
                    try:
                        hint = Hint.from_fields(fields)
                    except ValueError as error:
                        log.warning("malformed hint %s skipped: %s", entry_id, error)
                        continue
                    try:
                        on_hint(hint)
                    except Exception:
                        log.exception("hint %s (%s) not applied; going on", entry_id, hint.kind)
                        if on_error is not None:
                            on_error()
    finally:
        await client.aclose()


async def _entry_id_at(client, started_at: float) -> str:
    """The stream entry id of the moment `started_at` (time.monotonic()) by Redis's clock, which makes the
    ids: this worker's wall clock may be apart from it (a day ahead, every hint of that day was skipped)."""
    seconds, microseconds = await client.time()
    now_ms = seconds * 1000 + microseconds // 1000
    return f"{max(0, now_ms - int((time.monotonic() - started_at) * 1000))}-0"


def _text(entry_id: bytes | str) -> str:
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id
