"""Best-effort hint publishing: Redis being down never fails the operation that published."""

from __future__ import annotations

import logging

import redis

from control_plane import metrics
from openlora.hints import HINTS_MAXLEN, HINTS_STREAM, Hint

log = logging.getLogger(__name__)


class HintPublisher:
    """XADDs hints to `openlora:hints`; with no Redis URL it only logs."""

    def __init__(self, redis_url: str | None, timeout_s: float = 0.5) -> None:
        self._client = (
            redis.Redis.from_url(redis_url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
            if redis_url
            else None
        )

    def publish(self, hint: Hint) -> bool:
        """Returns whether the hint reached the stream."""
        if self._client is None:
            log.debug("no redis configured; hint dropped: %s", hint)
            return False
        try:
            self._client.xadd(HINTS_STREAM, hint.to_fields(), maxlen=HINTS_MAXLEN, approximate=True)
        except (redis.RedisError, OSError) as e:
            log.warning("hint not published (%s): %s", e, hint)
            metrics.HINTS_FAILED.labels(hint.kind).inc()
            return False
        metrics.HINTS_PUBLISHED.labels(hint.kind).inc()
        return True

    def invalidate(self, adapter_id: str, sha256: str = "", source_sha256: str = "") -> bool:
        """Workers forget cached answers naming `adapter_id` (as an adapter or as a saved mix's member);
        with `sha256` (only when no adapter uses that artifact any more) they also drop the content from
        every tier; with `source_sha256` (the content a deleted or replaced adapter served) they drop the
        merges built from it."""
        return self.publish(
            Hint(kind="invalidate", adapter_id=adapter_id, sha256=sha256, source_sha256=source_sha256)
        )

    def revoke(self, api_key_id: str) -> bool:
        """Workers forget cached answers for this key (by id: a plaintext key never goes to Redis)."""
        return self.publish(Hint(kind="revoke", adapter_id="", sha256="", api_key_id=api_key_id))

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
