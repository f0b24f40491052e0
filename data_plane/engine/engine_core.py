"""The engine core: the LLMEngine and its loop in a process of their own, and the worker's front to it.

In one process the engine thread and the worker's event loop share one interpreter lock: every torch op
the engine dispatches gives the lock up and must win it back from the event loop's Python (gRPC
callbacks, streams, usage), so each serving step also slows the engine's. `ProcessEngine` runs the
EngineLoop in a child process (spawned: no inherited threads, locks or device state) and keeps
AsyncEngine's interface in the worker: requests are validated there, against the engine's fixed limits
(`RequestValidator`), sent down a pipe, and each step's outputs come back in one message that a reader
thread hands to the event loop in one callback, into the same OutputStreams.

The pipe carries, worker to core: "add" (a request), "abort", "delivered" (a barrier token), "call" (a
cache command: invalidate, invalidate_content, set_keep_warm, demote, prefetch) and "stop"; core to
worker: "ready" (or "failed") once, then "outputs" (a step's, with the counts: running, waiting, adds
taken, KV use), "error" (an add refused, with its cause), "delivered", "counts" when they changed between
steps, "residency" when it changed, at most every RESIDENCY_INTERVAL_S (the adapters in each tier, the
loads in flight, load and prefetch counters) and "dead" (the loop stopped on a fault it cannot go on
from). The core's engine thread is its only thread: it reads the pipe itself, between steps and between
layers of a step, as the in-process loop reads its inbox.

Lifetimes: the core ignores SIGINT and SIGTERM (a signal to the worker's group must not cut a drain
short) and ends on "stop" or when the pipe closes, which the kernel does when the worker dies however it
dies; a core that dies makes every stream fail with EngineDead and `is_running` turn False, as a fatal
fault of the in-process loop does, so the worker exits and its supervisor starts it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import pickle
import queue
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from data_plane.engine.async_engine import (
    MAX_STEP_FAILURES,
    NOTHING,
    EngineLoop,
    StreamFront,
    resolve_barrier,
)
from data_plane.engine.config import EngineConfig
from data_plane.engine.errors import EngineDead, StepFailed
from data_plane.engine.info import EngineInfo, engine_info, kv_cache_usage
from data_plane.engine.llm_engine import RequestValidator
from data_plane.engine.request import EngineRequest, RequestOutput
from data_plane.tokenizer import Tokenizer
from openlora.base_model import BaseModelSpec
from openlora.log_level import LOG_FORMAT

log = logging.getLogger(__name__)

# The cache commands the worker may have the core run (LLMEngine's thread-safe methods of these names).
CACHE_COMMANDS = frozenset({"invalidate", "invalidate_content", "set_keep_warm", "demote", "prefetch"})
_STOP_TIMEOUT_S = 30.0  # a core that has not ended this long after "stop" is killed


@dataclass(frozen=True)
class CoreReady:
    """What the core tells the worker once its engine is built."""

    spec: BaseModelSpec
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    validator: RequestValidator
    info: EngineInfo


@dataclass(frozen=True)
class CoreCounts:
    """Sent with every step's outputs, and on their own when they change between steps."""

    num_running: int = 0
    num_waiting: int = 0  # in the engine's queue, or taken from the pipe and not yet into it
    adds_taken: int = 0  # adds the core has taken from the pipe, ever
    kv_cache_usage: float = 0.0


@dataclass(frozen=True)
class CoreResidency:
    """Sent when it changes, at most every RESIDENCY_INTERVAL_S."""

    device_keys: tuple[str, ...] = ()
    host_keys: tuple[str, ...] = ()
    loading: frozenset[str] = frozenset()
    calls_done: int = 0  # the last cache command ("call") the engine thread took
    load_counts: Mapping = field(default_factory=dict)
    load_ms_sums: Mapping = field(default_factory=dict)
    prefetch_stats: Mapping = field(default_factory=dict)


def portable(error: BaseException | None) -> BaseException | None:
    """`error` if it survives pickling, else a StepFailed that tells what it was (an exception whose
    class cannot be rebuilt in the worker must not take the step's other outputs down with it)."""
    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return StepFailed(f"{type(error).__name__}: {error}")
    return error


# The core process.

# The longest the residency the worker reads (tiers, loads in flight, counters) lags the core's: published
# when it changed, at most this often (each report builds the key lists again, on the engine's thread).
RESIDENCY_INTERVAL_S = 0.05


class _PipeSink:
    """The core's EngineLoop sink: everything goes down the pipe (the engine thread alone sends)."""

    def __init__(self, conn, engine) -> None:
        self._conn = conn
        self._engine = engine
        self._counts = CoreCounts()
        self._residency = CoreResidency()
        self._residency_at = 0.0
        self.loop: _PipeLoop | None = None

    def _send(self, message) -> None:
        with contextlib.suppress(OSError, EOFError):  # the worker is gone: the loop sees the pipe closed
            self._conn.send(message)

    def _counts_now(self) -> CoreCounts:
        engine = self._engine
        waiting, adds = self.loop.waiting_and_adds()
        return CoreCounts(engine.num_running, waiting, adds, kv_cache_usage(engine))

    def outputs(self, outputs: list[RequestOutput]) -> None:
        self._counts = counts = self._counts_now()  # one message a step: the outputs and the counts
        try:
            self._conn.send(("outputs", outputs, counts))
        except (OSError, EOFError):
            pass
        except Exception:  # an output's error would not pickle: those errors told as StepFailed
            for out in outputs:
                out.error = portable(out.error)
            self._send(("outputs", outputs, counts))

    def error(self, request_id: str, error: Exception) -> None:
        self._send(("error", request_id, portable(error), portable(error.__cause__)))

    def delivered(self, token) -> None:
        self._send(("delivered", token))

    def dead(self, error: BaseException) -> None:
        self._send(("dead", f"{type(error).__name__}: {error}"))

    def idle(self) -> None:
        counts = self._counts_now()
        if counts != self._counts:
            self._counts = counts
            self._send(("counts", counts))
        now = time.monotonic()
        if now - self._residency_at < RESIDENCY_INTERVAL_S:
            return
        self._residency_at = now
        engine = self._engine
        residency = CoreResidency(
            tuple(engine.resident_adapter_keys()),
            tuple(engine.host_adapter_keys()),
            engine.loader.loading_keys(),
            self.loop.calls_done,
            dict(engine.load_counts),
            dict(engine.load_ms_sums),
            engine.prefetch_stats(),
        )
        if residency != self._residency:
            self._residency = residency
            self._send(("residency", residency))


class _PipeLoop(EngineLoop):
    """The core's loop: the engine thread reads its commands off the pipe itself, between steps and
    between layers (as the in-process loop reads its inbox), so no second thread of the core competes with
    the engine for the core's interpreter lock."""

    def __init__(self, conn, engine, sink: _PipeSink, max_step_failures: int) -> None:
        super().__init__(engine, sink, max_step_failures)
        self._conn = conn
        self.calls_done = 0  # the number of the last cache command run

    def _input_waiting(self) -> bool:
        return self._ready(0)

    def _ready(self, timeout_s: float) -> bool:
        if self._stopping.is_set():
            return False
        try:
            return self._conn.poll(timeout_s)
        except (OSError, EOFError):
            self._closed()
            return False

    def _receive(self, timeout_s: float):
        """The next command off the pipe as an inbox item (None: nothing to handle), NOTHING when none
        came within `timeout_s`."""
        if not self._ready(timeout_s):
            return NOTHING
        try:
            message = self._conn.recv()
        except (OSError, EOFError):
            self._closed()
            return None
        kind = message[0]
        if kind == "add":
            request = message[1]
            # Disk reads of its adapters begin now, before the engine takes it in.
            self.engine.read_ahead(request)
            with self._submitted_lock:
                self._num_submitted += 1
                self.adds_submitted += 1
            return ("add", request)
        if kind in ("abort", "delivered"):
            return (kind, message[1])
        if kind == "call":
            _, number, name, args, kwargs = message
            if name not in CACHE_COMMANDS:
                log.error("the engine core was sent an unknown command %r", name)
                return None
            return ("call", self._cache_command(number, name, args, kwargs))
        if kind == "stop":
            self._stopping.set()
        return None

    def _cache_command(self, number: int, name: str, args, kwargs):
        def run() -> None:
            try:
                getattr(self.engine, name)(*args, **kwargs)
            finally:
                self.calls_done = number

        return run

    def _closed(self) -> None:
        if not self._stopping.is_set():
            log.warning("the worker's end of the engine core's pipe closed: the core stops")
        self._stopping.set()


def run_core(conn, config: EngineConfig, max_step_failures: int, log_level: int) -> None:
    """The core process's entry: builds the engine and runs its loop on this thread until "stop", until
    the worker's end of the pipe closes, or until a fault the engine cannot go on from."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format=LOG_FORMAT)
    from data_plane.engine.llm_engine import LLMEngine

    try:
        engine = LLMEngine(config)
    except BaseException as error:
        log.exception("the engine core could not build its engine")
        conn.send(("failed", portable(error)))
        return
    sink = _PipeSink(conn, engine)
    loop = _PipeLoop(conn, engine, sink, max_step_failures)
    sink.loop = loop
    conn.send(
        (
            "ready",
            CoreReady(
                engine.spec,
                engine.max_model_len,
                tuple(engine.model_config.eos_token_ids),
                engine.request_validator,
                engine_info(engine),
            ),
        )
    )
    try:
        loop.run()
    finally:
        engine.shutdown()


# The worker's side.


class ProcessEngine(StreamFront):
    """AsyncEngine's interface, the engine loop in a child process (the engine core)."""

    def __init__(
        self,
        config: EngineConfig,
        max_step_failures: int = MAX_STEP_FAILURES,
        stream_interval: int = 1,
    ) -> None:
        if max_step_failures < 1:
            raise ValueError(f"max_step_failures must be >= 1, got {max_step_failures}")
        super().__init__(config.max_waiting, stream_interval)
        self._config = config
        self._max_step_failures = max_step_failures
        self._process = None
        self._conn = None
        self._ready: CoreReady | None = None
        self._tokenizer: Tokenizer | None = None
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._counts = CoreCounts()
        self._residency = CoreResidency()
        self._adds_sent = 0
        self._call_numbers = itertools.count(1)
        self._prefetches_sent: dict[str, int] = {}  # key -> the number of its last prefetch call
        self._barrier_tokens = itertools.count()
        self._barrier_futures: dict[int, asyncio.Future] = {}
        self._stopping = False
        self.error: BaseException | None = None  # why the core stopped serving

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        context = multiprocessing.get_context("spawn")
        self._conn, child_end = context.Pipe()
        process = context.Process(
            target=run_core,
            args=(child_end, self._config, self._max_step_failures, logging.getLogger().getEffectiveLevel()),
            name="openlora-engine-core",
            daemon=True,
        )
        try:
            process.start()  # an error here (no memory for a process, a script without a main guard)
        finally:
            child_end.close()  # the core's end lives in the core alone: its death closes the pipe here
        self._process = process  # only a started process: `stop` joins it
        try:
            message = await asyncio.to_thread(self._conn.recv)
        except (EOFError, OSError):
            await asyncio.to_thread(self._process.join)
            raise EngineDead(
                f"the engine core exited while building its engine (exit code {self._process.exitcode})"
            ) from None
        if message[0] == "failed":
            await asyncio.to_thread(self._process.join, _STOP_TIMEOUT_S)
            raise message[1]
        self._ready = message[1]
        if self._ready.info.has_tokenizer:
            self._tokenizer = await asyncio.to_thread(
                Tokenizer.from_dir, self._config.model_dir, self._ready.eos_token_ids
            )
        threading.Thread(target=self._read, name="engine-core-reader", daemon=True).start()
        threading.Thread(target=self._write, name="engine-core-writer", daemon=True).start()

    async def stop(self) -> None:
        self._stopping = True
        if self._process is not None:
            self._outbox.put(("stop",))
            await asyncio.to_thread(self._process.join, _STOP_TIMEOUT_S)
            if self._process.is_alive():
                log.error("the engine core did not stop within %.0f s: killed", _STOP_TIMEOUT_S)
                self._process.kill()
                await asyncio.to_thread(self._process.join)
        self.fail_all(EngineDead("the engine stopped"))

    # The pipe.

    def _write(self) -> None:
        while True:
            message = self._outbox.get()
            try:
                self._conn.send(message)
            except (OSError, EOFError):
                return  # the core is gone: the reader tells the streams
            if message[0] == "stop":
                return

    def _read(self) -> None:
        loop = self._loop
        try:
            while True:
                message = self._conn.recv()
                kind = message[0]
                if kind == "outputs":
                    self._counts = message[2]
                    loop.call_soon_threadsafe(self._deliver_all, message[1])
                elif kind == "counts":
                    self._counts = message[1]
                elif kind == "residency":
                    self._residency = message[1]
                elif kind == "error":
                    _, request_id, error, cause = message
                    if cause is not None:
                        error.__cause__ = cause  # the server tells overload (out of files, memory) by it
                    loop.call_soon_threadsafe(self._deliver_error, request_id, error)
                elif kind == "delivered":
                    future = self._barrier_futures.pop(message[1], None)
                    if future is not None:
                        loop.call_soon_threadsafe(resolve_barrier, future)
                elif kind == "dead":
                    self._end(EngineDead(f"engine fault: {message[1]}"))
        except (EOFError, OSError):
            if not self._stopping:
                self._process.join(1.0)
                self._end(EngineDead(f"the engine core process exited (exit code {self._process.exitcode})"))
        except RuntimeError:  # the event loop closed under a core still talking: nobody is left to tell
            if not loop.is_closed():
                raise

    def _end(self, error: EngineDead) -> None:
        if self.error is None:
            log.error("the engine core stopped serving: %s", error)
            self.error = error
        with contextlib.suppress(RuntimeError):  # RuntimeError: the event loop closed, nobody to tell
            self._loop.call_soon_threadsafe(self.fail_all, error)

    # StreamFront.

    @property
    def is_running(self) -> bool:
        return (
            self._ready is not None
            and self.error is None
            and not self._stopping
            and self._process is not None
            and self._process.is_alive()
        )

    @property
    def num_waiting(self) -> int:
        """Waiting in the core, and sent to it but not yet taken (the last `counts` and this side's adds)."""
        counts = self._counts
        return counts.num_waiting + self._adds_sent - counts.adds_taken

    def _validate(self, request: EngineRequest) -> None:
        self._ready.validator.validate(request)

    def _submit_add(self, request: EngineRequest) -> None:
        self._adds_sent += 1
        self._outbox.put(("add", request))

    def _submit_barrier(self, future: asyncio.Future) -> None:
        token = next(self._barrier_tokens)
        self._barrier_futures[token] = future
        future.add_done_callback(lambda _: self._barrier_futures.pop(token, None))
        self._outbox.put(("delivered", token))

    def abort(self, request_id: str) -> None:
        if self._process is not None:
            self._outbox.put(("abort", request_id))

    # What the worker reads and asks of its engine.

    @property
    def num_running(self) -> int:
        return self._counts.num_running

    @property
    def kv_cache_usage(self) -> float:
        return self._counts.kv_cache_usage

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self._tokenizer

    @property
    def spec(self) -> BaseModelSpec:
        return self._started().spec

    @property
    def max_model_len(self) -> int:
        return self._started().max_model_len

    @property
    def max_lora_rank(self) -> int:
        return self._config.max_lora_rank

    @property
    def info(self) -> EngineInfo:
        return self._started().info

    def _started(self) -> CoreReady:
        if self._ready is None:
            raise RuntimeError("ProcessEngine.start() has not run")
        return self._ready

    def load_stats(self) -> tuple[dict, dict]:
        residency = self._residency
        return dict(residency.load_counts), dict(residency.load_ms_sums)

    def prefetch_stats(self) -> dict[tuple[str, str], int]:
        return dict(self._residency.prefetch_stats)

    def resident_adapter_keys(self) -> list[str]:
        return list(self._residency.device_keys)

    def host_adapter_keys(self) -> list[str]:
        return list(self._residency.host_keys)

    def is_loading(self, key: str) -> bool:
        """True while the core may still read `key` from disk: a load in flight at its last report, or a
        prefetch sent that the core had not taken by then."""
        residency = self._residency
        return key in residency.loading or self._prefetches_sent.get(key, 0) > residency.calls_done

    def invalidate(self, key: str) -> None:
        self._call("invalidate", key)

    def invalidate_content(self, sha256: str) -> None:
        self._call("invalidate_content", sha256)

    def set_keep_warm(self, key: str, holder: str, keep_warm: bool) -> None:
        self._call("set_keep_warm", key, holder, keep_warm)

    def demote(self, key: str) -> None:
        self._call("demote", key)

    def prefetch(self, key: str, members: tuple, **options) -> None:
        number = self._call("prefetch", key, members, **options)
        self._prefetches_sent[key] = number
        done = self._residency.calls_done
        for stale in [k for k, n in self._prefetches_sent.items() if n <= done]:
            del self._prefetches_sent[stale]

    def _call(self, name: str, *args, **kwargs) -> int:
        number = next(self._call_numbers)
        self._outbox.put(("call", number, name, args, kwargs))
        return number
