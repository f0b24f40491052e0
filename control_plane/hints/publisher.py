"""Hint publishing: Redis being down never fails the operation that published.

Prewarm and demote hints are advice: one that cannot be published is dropped. Invalidate and revoke hints
are not: each tells every worker to forget something it must no longer serve (a deleted or replaced
adapter, a revoked key). One that Redis did not take is kept, in order, and published again every
RETRY_INTERVAL_S until Redis takes it, so that workers learn of it as soon as Redis is back instead of only
when their cached answers expire (up to ten minutes while the control plane is unreachable as well). At
most MAX_PENDING are kept; past that the oldest go (logged), and the workers' cache TTL bounds them.
"""

from __future__ import annotations

import collections
import logging
import threading

import redis

from control_plane import metrics
from openlora.hints import HINTS_MAXLEN, HINTS_STREAM, Hint

log = logging.getLogger(__name__)

KEPT_KINDS = ("invalidate", "revoke")
RETRY_INTERVAL_S = 1.0
MAX_PENDING = 10_000


class HintPublisher:
    """XADDs hints to `openlora:hints`; with no Redis URL it only logs."""

    def __init__(self, redis_url: str | None, timeout_s: float = 0.5) -> None:
        self._client = (
            redis.Redis.from_url(redis_url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
            if redis_url
            else None
        )
        self._pending: collections.deque[Hint] = collections.deque()
        self._lock = threading.Lock()  # guards the queue and the retry thread's handle; no I/O under it
        self._stop = threading.Event()
        self._retry: threading.Thread | None = None

    @property
    def num_pending(self) -> int:
        """Invalidate and revoke hints waiting for Redis."""
        return len(self._pending)

    def publish(self, hint: Hint) -> bool:
        """Returns whether the hint reached the stream now (a kept kind that did not is published later).
        No call waits on Redis for another: a hint of a kept kind that finds others waiting queues behind
        them at once, and only the retry thread publishes the queue."""
        if self._client is None:
            log.debug("no redis configured; hint dropped: %s", hint)
            return False
        if hint.kind in KEPT_KINDS:
            with self._lock:
                if self._pending:
                    self._keep(hint, "earlier hints still wait for redis")
                    return False
        try:
            self._xadd(hint)
        except (redis.RedisError, OSError) as e:
            metrics.HINTS_FAILED.labels(hint.kind).inc()
            if hint.kind not in KEPT_KINDS:
                log.warning("hint not published (%s): %s", e, hint)
                return False
            with self._lock:
                self._keep(hint, str(e))
            return False
        return True

    def _xadd(self, hint: Hint) -> None:
        self._client.xadd(HINTS_STREAM, hint.to_fields(), maxlen=HINTS_MAXLEN, approximate=True)
        metrics.HINTS_PUBLISHED.labels(hint.kind).inc()

    def _keep(self, hint: Hint, why: str) -> None:
        """Queues a kept kind's hint and makes sure the retry thread runs (caller holds the lock)."""
        if len(self._pending) >= MAX_PENDING:
            log.error("hint dropped after %d waiting for redis: %s", MAX_PENDING, self._pending.popleft())
        self._pending.append(hint)
        log.warning("hint not published yet (%s), kept to publish when redis is back: %s", why, hint)
        if self._retry is None and not self._stop.is_set():
            self._retry = threading.Thread(target=self._retry_loop, name="hint-retry", daemon=True)
            self._retry.start()

    def _retry_loop(self) -> None:
        """Publishes the queue in order, the network calls outside the lock; ends once it is empty."""
        while not self._stop.wait(RETRY_INTERVAL_S):
            while True:
                with self._lock:
                    if not self._pending:
                        self._retry = None  # under the lock: a hint kept after this starts a new thread
                        return
                    hint = self._pending[0]
                try:
                    self._xadd(hint)
                except (redis.RedisError, OSError):
                    break  # still down: wait for the next interval
                except Exception:  # never let the thread die with hints queued
                    log.exception("publishing a kept hint failed")
                    break
                with self._lock:
                    self._pending.popleft()  # only this thread removes from the queue
                log.info("kept hint published: %s", hint)

    def invalidate(
        self, adapter_id: str, sha256: str = "", source_sha256: str = "", cache_scope: str | None = None
    ) -> bool:
        """Workers forget cached answers naming `adapter_id` (as an adapter or as a saved mix's member);
        with `sha256` (only when no adapter uses that artifact any more) they also drop the content from
        every tier; with `source_sha256` (the content a deleted or replaced adapter served) they drop the
        merges built from it. With `cache_scope` (not None) only the one cache key `sha256` and the scope
        make is dropped, with the merges built from it: other adapters still serve the content under
        other keys."""
        return self.publish(
            Hint(
                kind="invalidate",
                adapter_id=adapter_id,
                sha256=sha256,
                source_sha256=source_sha256,
                cache_scope=cache_scope or "",
                key_only=cache_scope is not None,
            )
        )

    def revoke(self, api_key_id: str) -> bool:
        """Workers forget cached answers for this key (by id: a plaintext key never goes to Redis)."""
        return self.publish(Hint(kind="revoke", adapter_id="", sha256="", api_key_id=api_key_id))

    def close(self) -> None:
        self._stop.set()
        retry = self._retry
        if retry is not None:
            retry.join(timeout=5)
        if self._pending:
            log.error("%d invalidate/revoke hints never reached redis", len(self._pending))
        if self._client is not None:
            self._client.close()
