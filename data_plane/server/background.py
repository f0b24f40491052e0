"""Background loops that survive: a loop that raises is logged, counted and started again after a
backoff, so a worker never loses its heartbeat, hints or residency publisher silently."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

RESTART_MIN_S = 0.5
RESTART_MAX_S = 30.0


async def keep_running(
    name: str,
    start: Callable[[], Awaitable[None]],
    on_error: Callable[[], None] | None = None,
    restart_min_s: float = RESTART_MIN_S,
    restart_max_s: float = RESTART_MAX_S,
) -> None:
    """Runs `start()` (a coroutine meant to loop forever) and starts it again whenever it raises or
    returns, waiting `restart_min_s`, doubling per failure in a row up to `restart_max_s` (a run that
    lasted longer than the wait resets it). Cancellation stops it."""
    delay_s = restart_min_s
    loop = asyncio.get_running_loop()
    while True:
        started_at = loop.time()
        try:
            await start()
            log.warning("background loop %s returned; starting it again", name)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("background loop %s failed; starting it again in %.1fs", name, delay_s)
        if on_error is not None:
            on_error()
        if loop.time() - started_at > delay_s:
            delay_s = restart_min_s
        await asyncio.sleep(delay_s)
        delay_s = min(delay_s * 2, restart_max_s)
