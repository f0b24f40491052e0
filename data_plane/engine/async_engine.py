"""The engine loop, and the streams asyncio callers read its outputs from.

`EngineLoop` owns an LLMEngine on a thread of its own: a thread-safe inbox takes adds, aborts and delivery
barriers, and each step's outputs go to a `Sink` in one call. `StreamFront` is the event-loop side: each
request's outputs wait in an OutputStream, which hands a consumer that lags everything made since it last
took as one output (the first token always alone): one message per take, not one per step. Two fronts:

- `AsyncEngine`: the loop on a thread of the worker's own process; the sink hands each step's outputs to
  the event loop in one `loop.call_soon_threadsafe`. A forward pass never blocks the event loop and the
  event loop never touches engine state, but the two share the interpreter.
- `data_plane.engine.engine_core.ProcessEngine`: the loop in a process of its own (the engine core), the
  same front over a pipe; the serving path's Python no longer competes with the engine's for one GIL.

No single request stops the loop: a step's fault fails the requests of that step (LLMEngine.step) and
the loop goes on. The loop stops only when the engine cannot go on: a fatal fault (out of memory, a
device error), `max_step_failures` failed steps in a row with no token made in between, or a fault
outside a step. Then every stream gets EngineDead and `is_running` turns False for the worker to exit.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import Counter
from collections.abc import AsyncIterator
from typing import Protocol

import torch

from data_plane.engine.config import EngineConfig
from data_plane.engine.errors import EngineDead, EngineError, InvalidRequest, QueueFull, StepFailed
from data_plane.engine.info import EngineInfo, engine_info, kv_cache_usage
from data_plane.engine.llm_engine import LLMEngine
from data_plane.engine.output_stream import OutputStream
from data_plane.engine.request import EngineRequest, RequestOutput
from data_plane.tokenizer import Tokenizer
from openlora.base_model import BaseModelSpec

log = logging.getLogger(__name__)
IDLE_POLL_S = 0.1
MAX_STEP_FAILURES = 5
NOTHING = object()  # EngineLoop._receive: no command came
# Messages of device faults after which the device state is undefined (torch raises them as RuntimeError).
_DEVICE_FAULT_MARKERS = ("CUDA error", "device-side assert", "illegal memory access", "CUBLAS_STATUS_")


def is_fatal(error: BaseException) -> bool:
    """True for a fault the engine cannot go on from: out of memory, or a device in an undefined state."""
    if isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    accelerator_error = getattr(torch, "AcceleratorError", None)  # device faults, in newer torch
    if accelerator_error is not None and isinstance(error, accelerator_error):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in _DEVICE_FAULT_MARKERS)


# The waiting queue's last places (an eighth) take only requests of tenants with fewer than FEW_REQUESTS
# in the engine: within the per-tenant stream cap, two tenants could otherwise fill the whole queue and
# lock every other tenant out (RESOURCE_EXHAUSTED) while they drain.
FEW_REQUESTS = 4


def num_reserved_waiting(max_waiting: int) -> int:
    return max_waiting // 8


class Sink(Protocol):
    """Where an EngineLoop hands what it makes; called on the engine thread."""

    def outputs(self, outputs: list[RequestOutput]) -> None:
        """One step's outputs, in order."""

    def error(self, request_id: str, error: Exception) -> None:
        """`request_id` was refused or failed on its way in (an add that raised)."""

    def delivered(self, token) -> None:
        """Every output of the steps before a "delivered" command was handed over before this call."""

    def dead(self, error: BaseException) -> None:
        """The loop stopped on `error` and will hand over nothing more."""

    def idle(self) -> None:
        """Between steps (and every idle poll): a moment to publish state."""


class EngineLoop:
    """An LLMEngine stepped on a thread of its own, fed through a thread-safe inbox."""

    def __init__(self, engine: LLMEngine, sink: Sink, max_step_failures: int = MAX_STEP_FAILURES) -> None:
        if max_step_failures < 1:
            raise ValueError(f"max_step_failures must be >= 1, got {max_step_failures}")
        self.engine = engine
        self._sink = sink
        self._max_step_failures = max_step_failures
        self.num_failed_steps = 0  # steps failed since a token was last made
        self._inbox: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        # Commands taken from the inbox during a step (anything but an add): handled at the step's end.
        self._deferred: list = []
        self._submitted_lock = threading.Lock()
        self._num_submitted = 0  # adds in the inbox, not yet taken by the engine thread
        self.adds_submitted = 0  # every add ever submitted (read with `waiting_and_adds`)
        self.error: BaseException | None = None  # the fault that stopped the loop

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    @property
    def num_waiting(self) -> int:
        """Requests waiting: in the engine's queue, and submitted but not yet taken in."""
        return self.engine.num_waiting + self._num_submitted

    def waiting_and_adds(self) -> tuple[int, int]:
        """`num_waiting` and `adds_submitted`, read together (no add counted in one and not the other)."""
        with self._submitted_lock:
            return self.engine.num_waiting + self._num_submitted, self.adds_submitted

    def start(self) -> None:
        """Runs the loop on a thread of its own."""
        self._thread = threading.Thread(target=self.run, name="engine-loop", daemon=True)
        self._thread.start()

    def submit_add(self, request: EngineRequest) -> None:
        with self._submitted_lock:
            self._num_submitted += 1
            self.adds_submitted += 1
        self._inbox.put(("add", request))

    def submit(self, kind: str, payload) -> None:
        """ "abort" (a request id), "delivered" (a token the sink's `delivered` gets back) or "call" (a
        function the engine thread runs between steps)."""
        self._inbox.put((kind, payload))

    def stop(self) -> None:
        """Stops the loop and waits for its thread (blocking)."""
        self._stopping.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join()

    def run(self) -> None:
        """The loop, on the calling thread, until stopped or a fault it cannot go on from."""
        engine = self.engine
        engine.set_between_layers(self._take_arrivals)
        try:
            while not self._stopping.is_set():
                self._drain_inbox(block=not engine.has_unfinished())
                if self._stopping.is_set():
                    break
                if engine.has_unfinished():
                    self._step()
                self._sink.idle()
        except BaseException as e:  # the engine cannot go on: fail every stream rather than hang them
            log.exception("engine loop stopped")
            self.error = e
            self._sink.dead(e)

    def _step(self) -> None:
        """One engine step; a fault that is neither fatal nor one too many in a row is logged and survived
        (the engine already failed that step's requests; their errors come with the next step)."""
        try:
            outputs = self.engine.step()
        except Exception as error:
            if is_fatal(error):
                raise
            self.num_failed_steps += 1
            log.exception(
                "engine step failed (%d in a row); its requests fail, the engine goes on",
                self.num_failed_steps,
            )
            if self.num_failed_steps >= self._max_step_failures:
                raise EngineDead(f"{self.num_failed_steps} engine steps failed in a row") from error
            return
        if any(out.new_token_ids for out in outputs):
            self.num_failed_steps = 0
        if outputs:
            self._sink.outputs(outputs)

    def _drain_inbox(self, block: bool) -> None:
        deferred, self._deferred = self._deferred, []
        for item in deferred:
            self._handle(item)
        item = self._receive(IDLE_POLL_S if block and not deferred else 0)
        while item is not NOTHING and not self._stopping.is_set():
            self._handle(item)
            item = self._receive(0)

    def _take_arrivals(self) -> None:
        """Between two layers of a running step: requests that arrived since it began join the engine now
        (their adapter copies start beside the rest of the step, so they are done by the next one); every
        other command waits for the step's end. `add_request` touches only the waiting queue, the adapter
        cache's free or unpinned slots and the loader, none of which the running step reads."""
        while self._input_waiting():
            item = self._receive(0)
            if item is NOTHING:
                return
            if item is not None and item[0] == "add":
                self._handle(item)
            else:
                self._deferred.append(item)

    # Where commands come from: this loop's inbox (a subclass reads another source).

    def _receive(self, timeout_s: float):
        """The next command, waiting at most `timeout_s` (0: not at all) for one; NOTHING when none came.
        None is the stop sentinel."""
        try:
            return self._inbox.get(timeout=timeout_s) if timeout_s > 0 else self._inbox.get_nowait()
        except queue.Empty:
            return NOTHING

    def _input_waiting(self) -> bool:
        """Whether a command may be waiting, cheaply (checked after every layer of a step)."""
        return bool(self._inbox.queue)  # unlocked peek (a late arrival waits for the next layer)

    def _handle(self, item) -> None:
        if item is None:  # stop: the loop sees _stopping
            return
        kind, payload = item
        if kind == "add":
            with self._submitted_lock:
                self._num_submitted -= 1
            try:
                self.engine.add_request(payload)
            except EngineError as e:
                self._sink.error(payload.request_id, e)
            except Exception as e:  # a fault met by this request alone: it fails, the engine goes on
                log.exception("adding request %s failed", payload.request_id)
                error = StepFailed("the engine failed to accept this request")
                error.__cause__ = e  # the server tells overload (out of files, memory) by the cause
                self._sink.error(payload.request_id, error)
        elif kind == "abort":
            self.engine.abort(payload)
        elif kind == "call":  # a function to run on the engine thread, between steps
            payload()
        else:  # "delivered": every earlier step's outputs were handed to the sink before this
            self._sink.delivered(payload)


class StreamFront:
    """The event-loop side of an engine: one OutputStream per request, fed by `_deliver_all` and
    `_deliver_error` (on the event loop). Subclasses say how a request reaches the engine loop."""

    def __init__(self, max_waiting: int, stream_interval: int = 1) -> None:
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {stream_interval}")
        # Tokens a stream's consumer is woken for past the first one (OutputStream's interval).
        self._stream_interval = stream_interval
        self._max_waiting = max_waiting
        self._streams: dict[str, OutputStream] = {}
        # Requests in the engine (running or waiting) per tenant: the waiting queue's last places are kept
        # for tenants with few of them (`num_reserved_waiting`).
        self._tenant_requests: Counter[str] = Counter()
        self._barriers: set[asyncio.Future] = set()  # wait_delivered calls the engine has not answered
        self._loop: asyncio.AbstractEventLoop | None = None

    # What a front provides.

    @property
    def is_running(self) -> bool:
        raise NotImplementedError

    @property
    def num_waiting(self) -> int:
        raise NotImplementedError

    def _validate(self, request: EngineRequest) -> None:
        """Raises InvalidRequest or AdapterLoadError for a request that can never run."""
        raise NotImplementedError

    def _submit_add(self, request: EngineRequest) -> None:
        raise NotImplementedError

    def _submit_barrier(self, future: asyncio.Future) -> None:
        """Has the engine loop answer `future` (`resolve_barrier`) once every earlier step's outputs are handed
        over."""
        raise NotImplementedError

    def abort(self, request_id: str) -> None:
        raise NotImplementedError

    # The streams.

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Streams the request's outputs; raises InvalidRequest, AdapterLoadError, QueueFull or EngineDead.

        Each item holds everything made since the previous one was taken (`OutputStream`): one step's
        output when the caller keeps up, several merged when it lags or until `stream_interval` tokens
        wait; the first token always alone, the end and errors never held back.
        Leaving the iteration early (close, cancel) aborts the request within one engine step.
        """
        if not self.is_running:
            raise EngineDead("the engine is not running")
        self._validate(request)
        if request.request_id in self._streams:
            raise InvalidRequest("request_id", f"{request.request_id!r} is already running")
        waiting, max_waiting = self.num_waiting, self._max_waiting
        if waiting >= max_waiting:
            raise QueueFull(f"{waiting} requests are waiting")
        reserved = num_reserved_waiting(max_waiting)
        if waiting >= max_waiting - reserved and self._tenant_requests[request.tenant] >= FEW_REQUESTS:
            raise QueueFull(
                f"{waiting} requests are waiting; the last {reserved} places are kept for tenants with fewer "
                f"than {FEW_REQUESTS} requests on this worker"
            )
        outputs = OutputStream(self._stream_interval)
        self._streams[request.request_id] = outputs
        self._tenant_requests[request.tenant] += 1
        self._submit_add(request)
        finished = False
        try:
            while True:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.error is not None:
                    finished = True
                    raise item.error
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request.request_id, None)
            self._tenant_requests[request.tenant] -= 1
            if self._tenant_requests[request.tenant] <= 0:
                del self._tenant_requests[request.tenant]
            if not finished:
                self.abort(request.request_id)

    async def wait_delivered(self) -> None:
        """Returns once the outputs of every step begun before this call are in their streams, so what a
        stream holds is known (the engine loop answers between two steps, after the last one's
        delivery, and what it hands over arrives in order)."""
        if not self.is_running:
            raise EngineDead("the engine is not running")
        delivered = self._loop.create_future()
        self._barriers.add(delivered)
        self._submit_barrier(delivered)
        try:
            await delivered
        finally:
            self._barriers.discard(delivered)

    # Event-loop thread.

    def _deliver_all(self, outputs: list[RequestOutput]) -> None:
        streams = self._streams
        for out in outputs:
            stream = streams.get(out.request_id)
            if stream is not None:  # None: the caller went away; the engine already dropped the request
                stream.put(out)

    def _deliver_error(self, request_id: str, error: Exception) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put(error)

    def fail(self, request_id: str, error: Exception) -> None:
        """Ends the open stream of `request_id`, if any, with `error` (from the event loop): what was made
        before it still reaches the caller, its next read then raises `error`; the engine drops the request
        within one step (the stream's generator takes an error it reads as the request's end, which it is
        only for the engine's own errors)."""
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put(error)
            self.abort(request_id)

    def fail_all(self, error: Exception) -> None:
        """Ends every open stream with `error` (from the event loop), as `fail` does each: each caller's
        next read raises it, and the engine drops the request."""
        for request_id in list(self._streams):
            self.fail(request_id, error)
        for barrier in self._barriers:  # the engine loop will not answer them any more
            if not barrier.done():
                barrier.set_exception(error)


class AsyncEngine(StreamFront):
    """The engine loop on a thread of this process; its outputs reach the event loop in one callback per
    step."""

    def __init__(
        self,
        config: EngineConfig | None = None,
        engine: LLMEngine | None = None,
        max_step_failures: int = MAX_STEP_FAILURES,
        stream_interval: int = 1,
    ) -> None:
        if (config is None) == (engine is None):
            raise ValueError("give exactly one of config and engine")
        if max_step_failures < 1:
            raise ValueError(f"max_step_failures must be >= 1, got {max_step_failures}")
        max_waiting = (config or engine.config).max_waiting
        super().__init__(max_waiting, stream_interval)
        self._config = config
        self._engine = engine
        self._max_step_failures = max_step_failures
        self._engine_loop: EngineLoop | None = None

    @property
    def engine(self) -> LLMEngine:
        if self._engine is None:
            raise RuntimeError("AsyncEngine.start() has not run")
        return self._engine

    @property
    def error(self) -> BaseException | None:
        """The fault that stopped the engine loop."""
        return None if self._engine_loop is None else self._engine_loop.error

    @property
    def num_failed_steps(self) -> int:
        return 0 if self._engine_loop is None else self._engine_loop.num_failed_steps

    @property
    def is_running(self) -> bool:
        return self._engine_loop is not None and self._engine_loop.is_running

    @property
    def num_running(self) -> int:
        return self.engine.num_running

    @property
    def num_waiting(self) -> int:
        if self._engine_loop is None:
            return self.engine.num_waiting
        return self._engine_loop.num_waiting

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    @property
    def spec(self) -> BaseModelSpec:
        return self.engine.spec

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def max_lora_rank(self) -> int:
        return self.engine.config.max_lora_rank

    @property
    def info(self) -> EngineInfo:
        return engine_info(self.engine)

    @property
    def kv_cache_usage(self) -> float:
        return kv_cache_usage(self.engine)

    def load_stats(self) -> tuple[dict, dict]:
        """(load counts, summed load ms) by (cause, source tier): copies."""
        return dict(self.engine.load_counts), dict(self.engine.load_ms_sums)

    def prefetch_stats(self) -> dict[tuple[str, str], int]:
        return self.engine.prefetch_stats()

    def resident_adapter_keys(self) -> list[str]:
        """Keys READY in a device slot: the snapshot the engine thread publishes, safe from any thread."""
        return self.engine.resident_adapter_keys()

    def host_adapter_keys(self) -> list[str]:
        """Keys with a copy in host memory: the engine thread's snapshot, safe from any thread."""
        return self.engine.host_adapter_keys()

    def invalidate(self, key: str) -> None:
        """Thread-safe: drops `key` from device slots and host memory at the next engine step."""
        self.engine.invalidate(key)

    def invalidate_content(self, sha256: str) -> None:
        """Thread-safe: drops every key of the content `sha256` (every cache scope) at the next step."""
        self.engine.invalidate_content(sha256)

    def set_keep_warm(self, key: str, holder: str, keep_warm: bool) -> None:
        """Thread-safe: adapter `holder` asks for `key` to stay warm (or no longer does)."""
        self.engine.set_keep_warm(key, holder, keep_warm)

    def demote(self, key: str) -> None:
        """Thread-safe: `LLMEngine.demote`."""
        self.engine.demote(key)

    def prefetch(self, key: str, members: tuple, **options) -> None:
        """Thread-safe: `LLMEngine.prefetch`."""
        self.engine.prefetch(key, members, **options)

    def is_loading(self, key: str) -> bool:
        """True while the loader may still read `key` from disk (a snapshot, safe from any thread)."""
        return self.engine.loader.is_loading(key)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._engine is None:
            self._engine = await asyncio.to_thread(LLMEngine, self._config)
        self._engine_loop = EngineLoop(self._engine, _LoopSink(self), self._max_step_failures)
        self._engine_loop.start()

    async def stop(self) -> None:
        if self._engine_loop is not None:
            await asyncio.to_thread(self._engine_loop.stop)
        if self._engine is not None:
            self._engine.shutdown()
        self.fail_all(EngineDead("the engine stopped"))

    def _validate(self, request: EngineRequest) -> None:
        self.engine.validate(request)

    def _submit_add(self, request: EngineRequest) -> None:
        # Disk reads of its adapters begin now, beside the running step, not once the engine takes it in.
        self.engine.read_ahead(request)
        self._engine_loop.submit_add(request)

    def _submit_barrier(self, future: asyncio.Future) -> None:
        self._engine_loop.submit("delivered", future)

    def abort(self, request_id: str) -> None:
        if self._engine_loop is not None:
            self._engine_loop.submit("abort", request_id)


class _LoopSink:
    """An AsyncEngine's sink: everything goes to the event loop through `call_soon_threadsafe`."""

    def __init__(self, front: AsyncEngine) -> None:
        self._front = front

    def outputs(self, outputs: list[RequestOutput]) -> None:
        self._front._loop.call_soon_threadsafe(self._front._deliver_all, outputs)

    def error(self, request_id: str, error: Exception) -> None:
        self._front._loop.call_soon_threadsafe(self._front._deliver_error, request_id, error)

    def delivered(self, token) -> None:
        self._front._loop.call_soon_threadsafe(resolve_barrier, token)

    def dead(self, error: BaseException) -> None:
        self._front._loop.call_soon_threadsafe(self._front.fail_all, EngineDead(f"engine fault: {error}"))

    def idle(self) -> None:
        pass


def resolve_barrier(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
