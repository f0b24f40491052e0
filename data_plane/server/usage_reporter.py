"""Usage reporting with a write-ahead spool, checkpoints of running streams and a dead-letter file.

Every usage record is appended to a local JSONL spool before anything else (flushed to the OS at once,
so a SIGKILL loses nothing already recorded; fsynced at least every `fsync_interval_s` against power
loss). A background task sends pending records in batches to the control plane at least every
`flush_interval_s`; acknowledged records are compacted out of the spool. When the control plane is
unreachable the records stay and are retried every flush interval; on start the spool is read back and
resent.

Running streams are checkpointed: one timer per worker walks the live streams (`track`) every
`checkpoint_interval_s` and appends the delivered count of each stream that moved as a record with the
stream's key and finish reason "interrupted". The final record supersedes them. Checkpoints stay in the
spool and are not sent while their stream runs; after a crash they are all that is left of it, and the
next start sends the newest one. A stream's first chunk is also checkpointed at once, as it is handed over,
so a SIGKILL right after a short answer still bills it. No other per-token work: the servicer only counts,
the timer reads.

Records of one (tenant, request id) merge by rank, here and at the control plane: the larger completion
count, then the larger prompt count, then a final over a checkpoint, never a sum. Request ids are chosen
by clients and two tenants may send the same one, so that pair is the key.

A batch the control plane refuses as invalid (INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE) is
split in halves and resent until the refused records stand alone; each goes to the dead-letter file
beside the spool (one JSON object a line: the record, the status and why) with a WARNING, and the rest
keeps flowing. Any other failure (unreachable, timeout) is retried at the next interval, nothing set aside.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

log = logging.getLogger(__name__)

# While sends fail, a WARNING at the first failure and then at most once per this many seconds.
FAILURE_LOG_INTERVAL_S = 30.0
# The finish reason of a checkpoint (the control plane knows it by the same name).
CHECKPOINT_FINISH_REASON = "interrupted"
# Status codes (names) that refuse a record for what it holds: resending it unchanged never succeeds.
REJECTED_CODES = frozenset({"INVALID_ARGUMENT", "FAILED_PRECONDITION", "OUT_OF_RANGE"})
# Spool lines appended since the last compaction beyond which checkpoints alone trigger one.
COMPACT_MIN_LINES = 1000
# Acknowledged records whose (tenant, request id) the worker remembers (about 15 MB; kept in a file beside
# the spool, so a restart keeps them): while the control plane cannot be asked, an id among them is still
# refused, not served again for free.
MAX_SETTLED_KEYS = 100_000
# A running stream ends (UNAVAILABLE) once the spool has refused writes for this long: what it delivers
# meanwhile is held in memory only, and a crash would lose it. About two checkpoint intervals: a crash
# while the disk is full loses at most this much of each stream, as it does when the disk is not full.
MAX_UNSPOOLED_S = 1.0


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
    finish_reason: str  # "stop" | "length" | "abort" | "error" | "interrupted" (a checkpoint)
    # "single" | "linear_mix" | "merge:<method>" | "ensemble" (see request_kind); "" in a record spooled by
    # an older worker, which the control plane bills per adapter as before.
    request_kind: str = ""
    mix_name: str = ""  # the saved mix the request named, else ""

    def to_json(self) -> str:
        # The fields read directly, not through dataclasses.asdict (a recursive deep copy): the checkpoint
        # timer serializes every live stream twice a second on the event loop.
        return json.dumps({name: getattr(self, name) for name in _RECORD_FIELDS}, separators=(",", ":"))

    @property
    def key(self) -> tuple[str, str]:
        """The idempotency key of the control plane: (tenant, request id)."""
        return self.tenant_id, self.request_id

    @property
    def rank(self) -> tuple[int, int, bool]:
        """Of two records with one key the higher rank wins: (completion, prompt tokens, final)."""
        return self.completion_tokens, self.prompt_tokens, self.finish_reason != CHECKPOINT_FINISH_REASON

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


_RECORD_FIELDS = tuple(f.name for f in fields(UsageRecord))


def _open_spool(path: Path):
    """The spool, opened to append bytes without a buffer (`UsageReporter._write`)."""
    return open(path, "ab", buffering=0)


_TEXT_FIELDS = (
    "request_id",
    "tenant_id",
    "worker_id",
    "base_model",
    "finish_reason",
    "request_kind",
    "mix_name",
)


def _fsync_and_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def request_kind(mix_method: str, num_adapters: int, saved_mix: bool = False) -> str:
    """The kind a request is billed as: "ensemble", "merge:<method>" (ties, dare_linear, dare_ties,
    magnitude_prune), "linear_mix" (two or more adapters summed, or a saved mix of one: it bills under
    its own name), else "single" (the base model or one adapter, however it was spelled)."""
    if mix_method == "ensemble" and num_adapters:
        return "ensemble"
    if mix_method != "linear" and num_adapters:
        return f"merge:{mix_method}"
    return "linear_mix" if num_adapters > 1 or (saved_mix and num_adapters) else "single"


# Sends one batch; raises on failure (nothing acknowledged), returns on success (all acknowledged).
Sender = Callable[[list[UsageRecord]], Awaitable[None]]
# A running stream's record so far (finish reason "interrupted"); None while it delivered nothing.
Checkpoint = Callable[[], UsageRecord | None]


def is_rejection(error: BaseException) -> bool:
    """Whether a send failed because the control plane refused what the batch holds (not transient)."""
    code = getattr(error, "code", None)
    if callable(code):  # grpc.RpcError.code()
        code = code()
    return getattr(code, "name", None) in REJECTED_CODES


class LiveStream:
    """A running stream the checkpoint timer reads; returned by `UsageReporter.track`."""

    __slots__ = ("read", "spooled")

    def __init__(self, read: Checkpoint) -> None:
        self.read = read
        # The newest checkpoint written to the spool (rewritten by every compaction while it runs).
        self.spooled: UsageRecord | None = None


@dataclass
class _Stats:
    sent: int = 0
    failures: int = 0
    pending: int = 0
    checkpoints: int = 0
    dead_lettered: int = 0
    last_error: str = field(default="")


class UsageReporter:
    def __init__(
        self,
        spool_path: Path,
        send: Sender,
        *,
        flush_interval_s: float = 1.0,
        fsync_interval_s: float = 0.2,
        checkpoint_interval_s: float = 0.5,
        batch_size: int = 500,
        dead_letter_path: Path | None = None,
        on_dead_letter: Callable[[], None] | None = None,
    ) -> None:
        self._path = Path(spool_path)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._dead_letter_path = (
            Path(dead_letter_path)
            if dead_letter_path is not None
            else self._path.with_name(f"{self._path.stem}.dead_letter.jsonl")
        )
        self._send = send
        self._flush_interval_s = flush_interval_s
        self._fsync_interval_s = fsync_interval_s
        self._checkpoint_interval_s = checkpoint_interval_s
        self._batch_size = batch_size
        self._on_dead_letter = on_dead_letter
        self._pending: dict[tuple[str, str], UsageRecord] = {}
        # The keys of the last MAX_SETTLED_KEYS records the control plane acknowledged, oldest first, and
        # the file that keeps them across restarts (appended as they settle, rewritten past twice that).
        self._settled: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._settled_path = self._path.with_name(f"{self._path.stem}.settled.jsonl")
        self._settled_lines = 0
        self._live: dict[int, LiveStream] = {}
        self._lines_since_compact = 0
        # Pending records settled (acknowledged or dead-lettered) since the spool was last rewritten.
        self._settled_since_compact = 0
        self._dirty = False
        self._wake = asyncio.Event()
        self._flushing = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        self.stats = _Stats()
        # The last spool write's failure; None once a write (or `probe_writable`) succeeds. While it is set
        # the worker takes no new calls and its health is NOT_SERVING.
        self.write_error: OSError | None = None
        # time.monotonic() of the first refused write since the last one that succeeded; None meanwhile.
        self._refusing_since: float | None = None
        self._load_spool()
        self._load_settled()
        self._file = _open_spool(self._path)  # closed in stop
        # Rewrite at once: a torn last line from a killed process must not swallow the next record.
        self._compact()

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    @property
    def dead_letter_path(self) -> Path:
        return self._dead_letter_path

    def pending_keys(self) -> list[tuple[str, str]]:
        """The (tenant, request id) of every record spooled and not yet acknowledged."""
        return list(self._pending)

    def has_pending(self, tenant_id: str, request_id: str) -> bool:
        """Whether usage under this (tenant, request id) is spooled and not yet acknowledged."""
        return (tenant_id, request_id) in self._pending

    def has_recorded(self, tenant_id: str, request_id: str) -> bool:
        """Whether this worker holds usage under this (tenant, request id): spooled, or among the last
        MAX_SETTLED_KEYS records the control plane acknowledged (it refuses such an id on its own; this
        answer holds while it cannot be asked)."""
        key = (tenant_id, request_id)
        return key in self._pending or key in self._settled

    def record(self, record: UsageRecord) -> None:
        """Spools one record (durable against a process kill on return); a record of a key already
        pending replaces it only when it outranks it."""
        held = self._pending.get(record.key)
        if held is not None and record.rank <= held.rank:
            return
        self._pending[record.key] = record
        self._append([record])
        if len(self._pending) >= self._batch_size:
            self._wake.set()

    def track(self, read: Checkpoint) -> LiveStream:
        """Registers a running stream: `read()` is called by the checkpoint timer (on the event loop)
        and returns its record so far, or None while it has delivered nothing. `untrack` it when its
        final record is spooled."""
        stream = LiveStream(read)
        self._live[id(stream)] = stream
        return stream

    def untrack(self, stream: LiveStream) -> None:
        self._live.pop(id(stream), None)

    def checkpoint(self, streams: Iterable[LiveStream] | None = None) -> int:
        """Spools the delivered count of every live stream (or of `streams`) that moved since its last
        checkpoint (one write and flush for all); returns how many were spooled."""
        moved = []
        for stream in list(self._live.values()) if streams is None else streams:
            try:
                record = stream.read()
            except Exception:  # one stream's fault must not stop the others' checkpoints
                log.exception("reading a stream's usage checkpoint failed")
                continue
            if record is None or (stream.spooled is not None and record.rank <= stream.spooled.rank):
                continue
            moved.append((stream, record))
        if moved:
            # Marked spooled once written: a count the spool refused is written by the next checkpoint.
            self._append([record for _, record in moved])
            for stream, record in moved:
                stream.spooled = record
            self.stats.checkpoints += len(moved)
            if self._lines_since_compact > max(COMPACT_MIN_LINES, 4 * (len(self._pending) + len(self._live))):
                self._compact()
        return len(moved)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._send_loop()),
            loop.create_task(self._fsync_loop()),
            loop.create_task(self._checkpoint_loop()),
        ]
        if self._pending:
            self._wake.set()

    async def stop(self, flush_timeout_s: float = 5.0) -> None:
        """Stops the background tasks after one last attempt to send what is pending. Streams still
        tracked get a last checkpoint, kept in the spool for the next start."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self.checkpoint()
        try:
            await asyncio.wait_for(self.flush(), flush_timeout_s)
        except Exception as error:  # the spool keeps them for the next start
            log.warning(
                "usage flush at stop failed, %d records stay in the spool: %s", self.num_pending, error
            )
        self._fsync()
        self._file.close()

    async def flush(self) -> None:
        """Sends every pending record now; raises when the control plane is unreachable. Records it
        refuses as invalid go to the dead-letter file instead."""
        async with self._flushing:  # one flush at a time: a record is sent, or set aside, once
            # The spool is rewritten once as many records were settled since its last rewrite as are
            # still pending (and when the flush ends): a catch-up of N records rewrites O(N) lines in
            # all. A rewrite after every batch made it O(N^2) on the event loop: 60,000 records after an
            # outage blocked every stream of the worker for over a minute.
            settled = 0
            while self._pending:
                batch = list(itertools.islice(self._pending.values(), self._batch_size))
                waiting = len(self._pending)
                try:
                    await self._deliver(batch)
                except BaseException:
                    # Only records settled since the last rewrite need one: a failed attempt that settled
                    # nothing (the control plane away) would rewrite every pending record for nothing.
                    if self._settled_since_compact:
                        self._compact()
                    raise
                settled += max(0, waiting - len(self._pending))
                if settled >= len(self._pending):
                    self._compact()
                    settled = 0

    async def _deliver(self, batch: list[UsageRecord]) -> None:
        """Sends `batch`; when it is refused as invalid, sends each half on its own, down to single
        records, which are dead-lettered. Transient failures raise."""
        try:
            await self._send(batch)
        except Exception as error:
            if not is_rejection(error):
                raise
            if len(batch) == 1:
                self._dead_letter(batch[0], error)
                return
            middle = len(batch) // 2
            await self._deliver(batch[:middle])
            await self._deliver(batch[middle:])
            return
        self._settle(batch)
        self.stats.sent += len(batch)

    def _settle(self, batch: list[UsageRecord]) -> None:
        """Drops these records from the pending set, unless a higher-ranked one replaced them meanwhile,
        and remembers their keys (in memory and in the settled file)."""
        for record in batch:
            if self._pending.get(record.key) is record:
                del self._pending[record.key]
                self._settled_since_compact += 1
            self._settled[record.key] = None
            self._settled.move_to_end(record.key)
        while len(self._settled) > MAX_SETTLED_KEYS:
            self._settled.popitem(last=False)
        self._keep_settled([record.key for record in batch])

    def _keep_settled(self, keys: list[tuple[str, str]]) -> None:
        """Appends settled keys to their file, rewritten from memory once it holds twice MAX_SETTLED_KEYS
        lines. A failed write is logged, never raised: the records are acknowledged either way, and a key
        the file missed is only forgotten by the next start. What a failed write began is undone (the
        append cut back to where it began, the rewrite's copy removed): a torn line swallowed the next key
        appended after it, and a partial copy held the space the next write needed."""
        try:
            if self._settled_lines + len(keys) > 2 * MAX_SETTLED_KEYS:
                tmp = self._settled_path.with_suffix(".tmp")
                try:
                    with open(tmp, "w", encoding="utf-8") as f:
                        f.writelines(json.dumps(key, separators=(",", ":")) + "\n" for key in self._settled)
                    os.replace(tmp, self._settled_path)
                except OSError:
                    with contextlib.suppress(OSError):
                        tmp.unlink(missing_ok=True)
                    raise
                self._settled_lines = len(self._settled)
                return
            fd = os.open(self._settled_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                start = os.lseek(fd, 0, os.SEEK_END)
                try:
                    lines = "".join(json.dumps(key, separators=(",", ":")) + "\n" for key in keys)
                    data = (lines or "\n").encode()
                    while data:
                        data = data[os.write(fd, data) :]
                except OSError:
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, start)
                    raise
            finally:
                os.close(fd)
            self._settled_lines += len(keys)
        except OSError as error:
            log.warning("settled usage keys not written to %s: %s", self._settled_path, error)

    def _load_settled(self) -> None:
        """Reads the settled keys a previous run kept (the last MAX_SETTLED_KEYS of them); unreadable
        lines (a torn last line) are skipped."""
        try:
            f = open(self._settled_path, "rb")  # noqa: SIM115 (closed below)
        except FileNotFoundError:
            return
        except OSError as error:  # the worker serves on; only this memory of earlier runs is missing
            log.warning("settled usage keys not read from %s: %s", self._settled_path, error)
            return
        torn = False
        with f:
            for raw in f:
                self._settled_lines += 1
                torn = not raw.endswith(b"\n")
                try:
                    tenant_id, request_id = json.loads(raw.decode("utf-8"))
                except (ValueError, TypeError):
                    continue
                if isinstance(tenant_id, str) and isinstance(request_id, str):
                    self._settled[(tenant_id, request_id)] = None
                    self._settled.move_to_end((tenant_id, request_id))
                    if len(self._settled) > MAX_SETTLED_KEYS:
                        self._settled.popitem(last=False)
        if torn:  # end the torn line, so that it does not swallow the next key appended
            self._keep_settled([])

    def _dead_letter(self, record: UsageRecord, error: BaseException) -> None:
        code = getattr(error, "code", None)
        code = code() if callable(code) else code
        entry = {
            "rejected_at": time.time(),
            "code": getattr(code, "name", str(code)),
            "error": str(error),
            "record": asdict(record),
        }
        with open(self._dead_letter_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._settle([record])
        self.stats.dead_lettered += 1
        if self._on_dead_letter is not None:
            self._on_dead_letter()
        log.warning(
            "usage record of request %r (tenant %s, %d completion tokens) refused by the control plane, "
            "moved to %s: %s",
            record.request_id,
            record.tenant_id,
            record.completion_tokens,
            self._dead_letter_path,
            error,
        )

    async def _send_loop(self) -> None:
        """Sends what is pending every flush interval, and at once when a full batch is pending. A failed
        send is retried one flush interval later for as long as it fails: not sooner (each record
        finished meanwhile woke the loop past a full batch, one failed call, WARNING and spool rewrite
        per finished request), and not later (a backoff doubling to 30 s held the usage of every call
        served during an outage that long after the control plane was back). An attempt against an
        unreachable control plane costs one failed call per interval."""
        failing_since: float | None = None
        warned_at = 0.0
        while True:
            if failing_since is None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._flush_interval_s)
            else:
                await asyncio.sleep(self._flush_interval_s)
            self._wake.clear()
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                self.stats.failures += 1
                self.stats.last_error = str(error)
                now = time.monotonic()
                if failing_since is None or now - warned_at >= FAILURE_LOG_INTERVAL_S:
                    log.warning(
                        "usage report failed (%d pending, retried every %.1fs): %s",
                        self.num_pending,
                        self._flush_interval_s,
                        error,
                    )
                    warned_at = now
                if failing_since is None:
                    failing_since = now
            else:
                if failing_since is not None:
                    log.info("usage reported again after %.1fs of failures", time.monotonic() - failing_since)
                failing_since = None
            self.stats.pending = self.num_pending

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(self._checkpoint_interval_s)
            try:
                self.checkpoint()
            except Exception:  # a full disk now must not end checkpoints for good
                log.exception("usage checkpoint failed")

    async def _fsync_loop(self) -> None:
        """Every `fsync_interval_s`, an fsync of the spool on a thread: one can take long on a busy or
        stalled disk, and on the event loop it held every stream, every health check and every new call
        for as long. The spool's descriptor is duplicated first, so a compaction that replaces the file
        meanwhile leaves the fsync a valid descriptor (of the old file, which the compaction synced)."""
        while True:
            await asyncio.sleep(self._fsync_interval_s)
            if not self._dirty or self._file.closed:
                continue
            self._dirty = False  # an append from here on sets it again, for the next round
            try:
                await asyncio.to_thread(_fsync_and_close, os.dup(self._file.fileno()))
            except OSError:
                self._dirty = True
                log.exception("usage spool fsync failed")

    def _append(self, records: list[UsageRecord]) -> None:
        text = "".join(record.to_json() + "\n" for record in records)
        if self._file.closed:  # a stream that ended after stop(): still durable
            with open(self._path, "a", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            return
        try:
            self._write(text)
        except OSError as error:
            self._refused(error)
            raise
        self._accepted()
        self._lines_since_compact += len(records)
        self._dirty = True

    def _write(self, text: str) -> None:
        """Appends `text` whole, or raises with nothing of it in the spool: a write the file system refuses
        (disk full) is cut back to where it began. Unbuffered, so nothing of a refused write waits in a
        buffer to land with the next one (its caller acted on the refusal: a first chunk refused for it was
        never delivered, and must never be billed)."""
        data = memoryview(text.encode("utf-8"))
        fd = self._file.fileno()
        start = os.fstat(fd).st_size
        try:
            while data:
                data = data[self._file.write(data) :]
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise

    def _refused(self, error: OSError) -> None:
        self.write_error = error
        if self._refusing_since is None:
            self._refusing_since = time.monotonic()

    def _accepted(self) -> None:
        self.write_error = None
        self._refusing_since = None

    def unspooled_too_long(self) -> bool:
        """Whether the spool has refused every write for more than MAX_UNSPOOLED_S: running streams end."""
        return self._refusing_since is not None and time.monotonic() - self._refusing_since > MAX_UNSPOOLED_S

    def probe_writable(self) -> bool:
        """Whether the spool's file system takes a write now: writes, fsyncs and removes a one-block file
        beside the spool. Clears `write_error` when it does, sets it when it does not."""
        probe = self._path.with_name(self._path.name + ".probe")
        try:
            self._write_probe(probe)
        except OSError as error:
            self._refused(error)
            with contextlib.suppress(OSError):
                probe.unlink()
            return False
        self._accepted()
        return True

    @staticmethod
    def _write_probe(probe: Path) -> None:
        with open(probe, "wb") as f:
            f.write(bytes(4096))
            f.flush()
            os.fsync(f.fileno())
        # Another probe of the same file (a caller beside the health loop's) may have removed it already:
        # the write succeeded all the same (that race read as ENOENT, an unwritable spool, and refused calls).
        probe.unlink(missing_ok=True)

    def _fsync(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
        self._dirty = False

    def _compact(self) -> None:
        """Rewrites the spool with the newest record of each key: the pending records and the live
        streams' last checkpoints. Atomic (temp file, fsync, rename)."""
        if self._file.closed:
            return
        newest = dict(self._pending)
        for stream in self._live.values():
            record = stream.spooled
            if record is not None and (record.key not in newest or record.rank > newest[record.key].rank):
                newest[record.key] = record
        tmp = self._path.with_suffix(".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                for record in newest.values():
                    f.write(record.to_json() + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as error:
            # What the copy wrote goes with it: left behind on a full disk, it held the space the spool's
            # appends (and the health probe) needed, and the worker refused calls until a compaction passed.
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            self._refused(error)
            raise
        self._file.close()
        os.replace(tmp, self._path)
        self._file = _open_spool(self._path)
        self._lines_since_compact = 0
        self._settled_since_compact = 0
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
                held = self._pending.get(record.key)
                # A stream's checkpoints and its final record share a key: the highest rank stands.
                if held is None or record.rank > held.rank:
                    self._pending[record.key] = record
        if self._pending:
            log.info("usage spool holds %d unsent records; resending", len(self._pending))
