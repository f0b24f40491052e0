"""Best-effort consumer of the control plane's `openlora:hints` Redis stream.

Only `invalidate` is acted on here: the named artifact is dropped from the authorisation cache and the
local disk, so a deleted or replaced adapter stops being served at once instead of after the cache TTL.
Serving never depends on this: with Redis down the listener retries quietly and the TTL still bounds
how long a stale answer lives.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from openlora.hints import HINTS_STREAM, Hint

log = logging.getLogger(__name__)

RETRY_S = 2.0
BLOCK_MS = 1000


async def listen_for_hints(redis_url: str, on_hint: Callable[[Hint], None]) -> None:
    """Reads new stream entries forever (from the moment it starts) and hands each hint to `on_hint`."""
    import redis.asyncio as redis

    client = redis.from_url(redis_url)
    last_id = "$"
    try:
        while True:
            try:
                entries = await client.xread({HINTS_STREAM: last_id}, block=BLOCK_MS, count=100)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # Redis is advisory: wait and try again
                log.debug("hint stream unavailable: %s", error)
                await asyncio.sleep(RETRY_S)
                continue
            for _stream, messages in entries or ():
                for entry_id, fields in messages:
                    last_id = entry_id
                    try:
                        hint = Hint.from_fields(fields)
                    except ValueError as error:
                        log.warning("malformed hint %s skipped: %s", entry_id, error)
                        continue
                    on_hint(hint)
    finally:
        await client.aclose()
