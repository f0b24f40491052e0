"""Usage reporting with a write-ahead spool.

Every usage record is appended to a local JSONL spool before anything else (flushed to the OS at once,
so a SIGKILL loses nothing already recorded; fsynced at least every `fsync_interval_s` against power
loss). A background task sends pending records in batches to the control plane at least every
`flush_interval_s`; acknowledged records are compacted out of the spool. When the control plane is
unreachable the records stay and are retried with backoff; on start the spool is read back and resent.
The control plane records each (tenant, request_id) once, so resending never double counts; the spool
keys records the same way, since request ids are chosen by clients and two tenants may send the same one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0


@dataclass(frozen=True)
class UsageRecord:
    request_id: str
    tenant_id: str
    # (adapter_id, weight) pairs; empty for the base model alone.
    adapters: tuple[tuple[str, float], ...]
    worker_id: str
    base_model: str
    prompt_tokens: int
    completion_tokens: int
    queue_ms: float
    ttft_ms: float
    total_ms: float
    finished_at: float  # unix seconds
    finish_reason: str  # "stop" | "length" | "abort" | "error"

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @property
    def key(self) -> tuple[str, str]:
        """The idempotency key of the control plane: (tenant, request id)."""
        return self.tenant_id, self.request_id

    @classmethod
    def from_json(cls, line: str) -> UsageRecord:
        """Raises ValueError for anything but a whole record with fields of the right types."""
        data = json.loads(line)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        data["adapters"] = tuple((str(a), float(w)) for a, w in data["adapters"])
        record = cls(**data)
        if not all(isinstance(getattr(record, f), str) for f in _TEXT_FIELDS):
            raise ValueError("a text field is not a string")
        return record


_TEXT_FIELDS = ("request_id", "tenant_id", "worker_id", "base_model", "finish_reason")


# Sends one batch; raises on failure (nothing acknowledged), returns on success (all acknowledged).
Sender = Callable[[list[UsageRecord]], Awaitable[None]]


@dataclass
class _Stats:
    sent: int = 0
    failures: int = 0
    pending: int = 0
    last_error: str = field(default="")


class UsageReporter:
    def __init__(
        self,
        spool_path: Path,
        send: Sender,
        *,
        flush_interval_s: float = 1.0,
        fsync_interval_s: float = 0.2,
        batch_size: int = 500,
    ) -> None:
        self._path = Path(spool_path)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._send = send
        self._flush_interval_s = flush_interval_s
        self._fsync_interval_s = fsync_interval_s
        self._batch_size = batch_size
        self._pending: dict[tuple[str, str], UsageRecord] = {}
        self._dirty = False
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.stats = _Stats()
        self._load_spool()
        self._file = open(self._path, "a", encoding="utf-8")  # noqa: SIM115 (closed in stop)
        # Rewrite at once: a torn last line from a killed process must not swallow the next record.
        self._compact()

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def has_pending(self, tenant_id: str, request_id: str) -> bool:
        """Whether usage under this (tenant, request id) is spooled and not yet acknowledged."""
        return (tenant_id, request_id) in self._pending

    def record(self, record: UsageRecord) -> None:
        """Appends one record to the spool (durable against a process kill on return)."""
        if record.key in self._pending:
            return
        self._pending[record.key] = record
        self._file.write(record.to_json() + "\n")
        self._file.flush()
        self._dirty = True
        if len(self._pending) >= self._batch_size:
            self._wake.set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._send_loop()), loop.create_task(self._fsync_loop())]
        if self._pending:
            self._wake.set()

    async def stop(self, flush_timeout_s: float = 5.0) -> None:
        """Stops the background tasks after one last attempt to send what is pending."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        try:
            await asyncio.wait_for(self.flush(), flush_timeout_s)
        except Exception as error:  # the spool keeps them for the next start
            log.warning(
                "usage flush at stop failed, %d records stay in the spool: %s", self.num_pending, error
            )
        self._fsync()
        self._file.close()

    async def flush(self) -> None:
        """Sends every pending record now; raises when the control plane refuses or is unreachable."""
        while self._pending:
            batch = list(self._pending.values())[: self._batch_size]
            await self._send(batch)
            for record in batch:
                self._pending.pop(record.key, None)
            self.stats.sent += len(batch)
            self._compact()

    async def _send_loop(self) -> None:
        backoff_s = self._flush_interval_s
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), backoff_s)
            self._wake.clear()
            try:
                await self.flush()
                backoff_s = self._flush_interval_s
            except asyncio.CancelledError:
                raise
            except Exception as error:
                self.stats.failures += 1
                self.stats.last_error = str(error)
                backoff_s = min(max(backoff_s * 2, self._flush_interval_s), MAX_BACKOFF_S)
                log.warning(
                    "usage report failed (%d pending, retry in %.1fs): %s", self.num_pending, backoff_s, error
                )
            self.stats.pending = self.num_pending

    async def _fsync_loop(self) -> None:
        while True:
            await asyncio.sleep(self._fsync_interval_s)
            if self._dirty:
                self._fsync()

    def _fsync(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
        self._dirty = False

    def _compact(self) -> None:
        """Rewrites the spool with the pending records only; atomic (temp file, fsync, rename)."""
        tmp = self._path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for record in self._pending.values():
                f.write(record.to_json() + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._file.close()
        os.replace(tmp, self._path)
        self._file = open(self._path, "a", encoding="utf-8")  # noqa: SIM115
        self._dirty = False

    def _load_spool(self) -> None:
        if not self._path.exists():
            return
        # Bytes, decoded line by line: a torn or corrupt line (even invalid UTF-8) costs only itself.
        with open(self._path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                line = raw.strip()
                if not line:
                    continue
                try:
                    record = UsageRecord.from_json(line.decode("utf-8"))
                except (ValueError, TypeError, KeyError):
                    # Only the last line can be torn by a kill mid-write; anything else is logged.
                    log.warning("usage spool line %d unreadable, skipped", line_no)
                    continue
                self._pending[record.key] = record
        if self._pending:
            log.info("usage spool holds %d unsent records; resending", len(self._pending))
