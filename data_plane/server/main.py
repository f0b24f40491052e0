"""The worker process: engine + InferenceService + health + reflection + metrics on one port.

`serve_worker(config)` starts everything in the running event loop and returns a `RunningWorker`
(tests bind 127.0.0.1:0 and read `.port`); `run_worker(config)` is the process entry: it serves until
SIGTERM or SIGINT, then drains (health NOT_SERVING, new calls UNAVAILABLE, in-flight streams finish
within the grace period), tells the control plane it leaves, flushes usage and returns 0. If the engine
loop dies (a fault it cannot go on from), health turns NOT_SERVING and the process exits with
ENGINE_DEAD_EXIT_CODE for its supervisor (`openlora up`, a container runtime) to restart it. If its worker
id is registered by another process meanwhile (this one was cut off from the control plane for longer
than three heartbeat intervals, and a copy of it took over), the control plane refuses its heartbeats and
then its registration while that process is live: it drains and exits with IDENTITY_LOST_EXIT_CODE.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import re
import signal
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from data_plane.adapters.hint_actions import apply_hint, publish_residency
from data_plane.server.artifact_store import ArtifactStore, default_disk_cache_bytes
from data_plane.server.background import keep_running
from data_plane.server.config import WorkerConfig
from data_plane.server.control_plane_client import ControlPlaneClient, ControlPlaneError
from data_plane.server.errors import Draining
from data_plane.server.generation import GenerationService, WorkerState
from data_plane.server.hint_listener import listen_for_hints
from data_plane.server.metrics import AdapterActivity, EngineLoad, WorkerMetrics
from data_plane.server.openai_http import HttpServer, OpenAIApi, build_app
from data_plane.server.openai_http import server as http_server
from data_plane.server.openai_http.app import control_plane_catalog
from data_plane.server.openai_http.chat_template import load_chat_template
from data_plane.server.servicer import InferenceServicer
from data_plane.server.usage_reporter import UsageReporter
from data_plane.server.validation import RequestLimits
from openlora.artifact import claim_artifacts_dir
from openlora.gc_tuning import settle_heap
from openlora.grpc_decoding import RequestDecodingInterceptor
from openlora.grpc_limits import connection_cap, server_options
from openlora.hints import Hint
from openlora.listen import ListenError, bind, listen_error
from openlora.text_rules import MAX_KEPT_REQUEST_IDS
from openlora.v1 import inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)

INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
ENGINE_WATCH_INTERVAL_S = 1.0
REGISTER_RETRY_MAX_S = 5.0
ENGINE_DEAD_EXIT_CODE = 3  # the engine loop died: restart the process
# Another process registered this worker's id and is live (its heartbeats are refused, and so is registering
# again): a restart registers again, and is refused (ALREADY_EXISTS naming worker_id) while it stays live.
IDENTITY_LOST_EXIT_CODE = 4
TASK_STOP_TIMEOUT_S = 5.0  # how long stop() waits for its cancelled background tasks
STREAM_END_TIMEOUT_S = 2.0  # how long stop() waits, after the grace, for ended streams to tell their callers
STATE_DIR_PID_FILE = "worker.pid"  # the pid of the worker that holds the state dir (`lock_state_dir`)
_INSTANCE_ID = re.compile(r"[0-9a-f]{32}")  # a run's instance id, as `_start_serving` makes it
# A worker id as a state dir's file may hold it: printable, no spaces (the control plane takes up to 128
# characters but for NUL; what a file of the worker's own holds is 32 hex digits, `register_worker`).
_WORKER_ID_FILE_TEXT = re.compile(r"[!-~\u00a1-\uffef]{1,128}")


class StateDirInUse(RuntimeError):
    """Another worker process holds this worker's state dir: they would share one worker id (each
    releasing the other's request id reservations at its start) and one usage spool."""


class StateDirUnwritable(RuntimeError):
    """The worker's state dir takes no write (a full disk, read-only): its usage spool could not record
    a call either. Another start may find room."""

    def __init__(self, state_dir: Path | str, error: OSError) -> None:
        super().__init__(
            f"the state directory {state_dir} cannot be written ({error.strerror}): free space there, or "
            "give this worker another one (--state-dir, OPENLORA_STATE_DIR)"
        )


def build_engine(config: WorkerConfig):
    """The engine for this worker (loads the model: seconds to minutes, call off the event loop)."""
    from data_plane.engine.async_engine import AsyncEngine
    from data_plane.engine.config import EngineConfig
    from data_plane.engine.engine_core import ProcessEngine

    settings = {f.name: getattr(config.engine, f.name) for f in fields(config.engine)}
    engine_config = EngineConfig(
        model_dir=Path(config.model_dir),
        max_waiting=config.max_waiting,
        **{name: value for name, value in settings.items() if value is not None},
    )
    if config.engine_core == "process":
        return ProcessEngine(engine_config, stream_interval=config.stream_interval)
    return AsyncEngine(engine_config, stream_interval=config.stream_interval)


@dataclass
class RunningWorker:
    config: WorkerConfig
    port: int
    server: grpc.aio.Server
    engine: object
    control_plane: ControlPlaneClient
    usage: UsageReporter
    health: health.aio.HealthServicer
    state: WorkerState
    metrics: WorkerMetrics
    # The OpenAI-compatible HTTP API (config.http_listen); None when off.
    http: HttpServer | None = None
    # This process run, as registered (the control plane takes heartbeats and the leave from it alone).
    instance_id: str = ""
    # Why the control plane refused this instance's heartbeats (another process holds its worker id now);
    # empty while it holds the id.
    lost_identity: str = ""
    _tasks: list[asyncio.Task] = field(default_factory=list)
    # Hints being acted on (a prewarm may be fetching its artifact); cancelled at stop.
    _hint_tasks: set[asyncio.Task] = field(default_factory=set)
    _stopped: bool = False

    @property
    def address(self) -> str:
        host = self.config.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        """`http://HOST:PORT/v1` of the OpenAI-compatible API; empty when it is off."""
        if self.http is None:
            return ""
        host = self.http.host if ":" not in self.http.host else f"[{self.http.host}]"
        return f"http://{host}:{self.http.port}/v1"

    @property
    def worker_id(self) -> str:
        return self.state.worker_id

    def lose_identity(self, message: str) -> None:
        """The control plane refused a heartbeat, and registering again: another process registered this
        worker's id and is live (`ControlPlaneClient.run_heartbeats`). New calls are refused at once
        (draining: health NOT_SERVING, UNAVAILABLE); the process entry then drains and exits with
        IDENTITY_LOST_EXIT_CODE. Serving on under the id, both processes shared its request id reservations
        and its usage, and counted as one live worker."""
        log.error("worker %s stops serving: its id is another process's now (%s)", self.worker_id, message)
        self.lost_identity = message
        self.state.draining = True
        health = asyncio.get_running_loop().create_task(
            self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        )
        self._tasks.append(health)

    async def stop(self, grace_s: float | None = None) -> None:
        """Drains: NOT_SERVING, new calls UNAVAILABLE, in-flight streams get up to `grace_s` to finish;
        then stops the server, flushes usage and stops the engine."""
        if self._stopped:
            return
        self._stopped = True
        grace_s = self.config.drain_grace_s if grace_s is None else grace_s
        self.state.draining = True
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.state.in_flight:
            log.info("draining %d in-flight streams (grace %.1fs)", self.state.in_flight, grace_s)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.state.idle.wait(), grace_s)
        if self.state.in_flight:
            # The grace is over: each stream still running ends with UNAVAILABLE "draining" through its own
            # transport (an HTTP stream's last event is then that error and [DONE], not a cut connection),
            # and bills what it delivered, before the servers close the connections.
            log.info("drain grace over: ending %d streams", self.state.in_flight)
            self.engine.fail_all(Draining())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.state.idle.wait(), STREAM_END_TIMEOUT_S)
        await self.server.stop(0)
        if self.http is not None:
            await self.http.stop()
        tasks = [*self._tasks, *self._hint_tasks]
        for task in tasks:
            task.cancel()
        # Bounded: a background task that swallows its cancellation (a client library inside a blocking read)
        # must not keep the worker from stopping; it is logged and left behind.
        _, stuck = await asyncio.wait(tasks, timeout=TASK_STOP_TIMEOUT_S) if tasks else ((), ())
        for task in stuck:
            log.warning(
                "background task %s did not stop within %.0f s; stopping without it",
                task.get_name(),
                TASK_STOP_TIMEOUT_S,
            )
        if not self.lost_identity:
            await self._leave()
        await self.usage.stop()
        await self.engine.stop()
        await self.control_plane.close()
        await asyncio.to_thread(self.metrics.close_http)
        log.info("worker stopped")

    async def _leave(self) -> None:
        """Drained and no longer beating: the control plane stops counting this worker as live at once
        (its rank limit, its base model's dimensions, its id). Not before the drain: another process could
        take the id while streams still ran under it. A failure only leaves it to the heartbeat rule."""
        try:
            await self.control_plane.deregister(self.worker_id, self.instance_id)
        except ControlPlaneError as error:
            log.warning(
                "the control plane was not told this worker left (%s); it stops counting as live when its "
                "heartbeats are missed",
                error.message,
            )
            return
        log.info("worker %s left the control plane's live workers", self.worker_id)

    async def wait(self) -> None:
        await self.server.wait_for_termination()

    async def _set_health(self, status) -> None:
        for service in ("", INFERENCE_SERVICE):
            await self.health.set(service, status)


async def serve_worker(config: WorkerConfig, engine=None) -> RunningWorker:
    """Starts a worker in the running loop. `engine` (an AsyncEngine) is built from config when None."""
    Path(config.state_dir).mkdir(parents=True, exist_ok=True)
    claim_artifacts_dir(config.artifacts_dir, "worker", mark=False)  # before the model loads: refused at once
    if engine is None:
        engine = await asyncio.to_thread(build_engine, config)
    await engine.start()
    server = metrics = None
    try:
        # The name announced is the configured one (the fingerprint, not the name, decides what fits).
        spec = dataclasses.replace(engine.spec, name=config.base_model_name)

        http_connections = _http_descriptors() if config.http_listen else 0
        max_connections = connection_cap(config.max_connections, http_connections, server="worker")
        server = grpc.aio.server(
            interceptors=[RequestDecodingInterceptor()], options=server_options(max_connections)
        )
        port = bind(server, config.listen, "--listen (OPENLORA_LISTEN)")
        log.info(
            "worker listening on %s (port %d, at most %d gRPC connections)",
            config.listen,
            port,
            max_connections,
        )
        metrics = WorkerMetrics()
        if config.metrics_port:  # bound before registering: a worker that cannot listen never registers
            metrics.serve_http(config.metrics_port)
        host = config.listen.rsplit(":", 1)[0]
        address = config.advertise_address or f"{host}:{port}"
        state = WorkerState(base_model=spec.name)
        state.idle.set()
        # Answering from the moment it listens: health NOT_SERVING and Generate UNAVAILABLE while it registers
        # (a control plane or database down at start kept them for minutes on a port that took connections
        # and never spoke HTTP/2: probes and callers hung to their deadlines).
        inference = InferenceServicer(None, metrics, state)
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(inference, server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (
                INFERENCE_SERVICE,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        for service in ("", INFERENCE_SERVICE):
            await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        return await _start_serving(
            config, engine, spec, server, port, address, metrics, state, inference, health_servicer
        )
    except BaseException:  # it never served: stop what it started (a process exits anyway; a test goes on)
        if server is not None:
            await server.stop(None)
        if metrics is not None:
            await asyncio.to_thread(metrics.close_http)
        await engine.stop()
        raise


def _http_descriptors() -> int:
    """Descriptors the HTTP listener may hold: its connection cap and the overflow it answers 503."""
    return http_server.MAX_CONNECTIONS + http_server.OVERFLOW_CONNECTIONS


def _http_connection_cap(config: WorkerConfig) -> int:
    """The HTTP listener's connection cap: its share, beside the gRPC server's, of what the open-file
    limit leaves after the reserve, less its overflow (under a low limit the HTTP cap alone could take
    every descriptor, as the gRPC one did before it was lowered to its share)."""
    share = connection_cap(_http_descriptors(), config.max_connections, server="HTTP API")
    return max(1, min(http_server.MAX_CONNECTIONS, share - http_server.OVERFLOW_CONNECTIONS))


async def _start_serving(
    config: WorkerConfig,
    engine,
    spec,
    server: grpc.aio.Server,
    port: int,
    address: str,
    metrics: WorkerMetrics,
    state: WorkerState,
    inference: InferenceServicer,
    health_servicer: health.aio.HealthServicer,
) -> RunningWorker:
    """The rest of `serve_worker` once the gRPC server answers: registration, usage, artifacts, the
    generation service, the HTTP API, then SERVING."""
    control_plane = ControlPlaneClient(
        config.control_plane_target,
        config.worker_token,
        auth_cache_ttl_s=config.auth_cache_ttl_s,
        auth_cache_max_entries=config.auth_cache_max_entries,
    )
    worker_id = config.worker_id or _read_worker_id(config)
    # This run's instance: the control plane refuses the id to another process while this one is live,
    # and takes it from this state dir's previous run at once (its row may still look live after a crash).
    instance_id = uuid.uuid4().hex
    previous_instance_id = _previous_instance(config.worker_instance_path)

    async def register() -> float:
        new_id, interval_s = await control_plane.register(
            worker_id or state.worker_id,
            address,
            spec,
            config.engine.max_lora_rank,
            config.engine.num_adapter_slots,
            instance_id,
            previous_instance_id,
        )
        state.worker_id = new_id
        if not config.worker_id:
            _write_whole(config.worker_id_path, new_id)
        _write_instance(config.worker_instance_path, instance_id)
        return interval_s

    heartbeat_s = await _register_with_retry(register)
    log.info("registered as worker %s (base model %s, %s)", state.worker_id, spec.name, address)

    info = engine.info
    log.info(
        "base weights: %s, %.2f bits per weight in the decoder linears, %.1f MiB resident; on %s, "
        "computing in %s; engine core: %s",
        info.weight_format,
        info.decoder_bits_per_weight,
        info.weight_bytes / 2**20,
        info.device,
        info.compute_dtype,
        config.engine_core,
    )
    if not info.has_tokenizer:
        log.warning(
            "the model directory has no tokenizer: prompts must be token ids, and completions carry token "
            "ids but no text (the HTTP API's text fields stay empty)"
        )
    metrics.set_base_weights(info.weight_format, info.decoder_bits_per_weight, info.weight_bytes)
    control_plane.set_base_weights(info.weight_format, info.decoder_bits_per_weight, info.weight_bytes)
    metrics.watch_engine_loads(engine.load_stats)
    metrics.watch_prefetches(engine.prefetch_stats)
    usage = UsageReporter(
        config.usage_spool_path,
        control_plane.report_usage,
        flush_interval_s=config.usage_flush_interval_s,
        fsync_interval_s=config.usage_fsync_interval_s,
        checkpoint_interval_s=config.usage_checkpoint_interval_s,
        batch_size=config.usage_batch_size,
        dead_letter_path=config.usage_dead_letter_path,
        on_dead_letter=metrics.usage_dead_letter.inc,
    )
    await usage.start()
    await _release_stale_request_ids(control_plane, state.worker_id, usage)
    disk_cache_bytes = config.disk_cache_bytes
    if disk_cache_bytes is None:
        disk_cache_bytes = default_disk_cache_bytes(config.artifacts_dir)
    claim_artifacts_dir(config.artifacts_dir, "worker")
    artifacts = ArtifactStore(
        config.artifacts_dir,
        control_plane.fetch_artifact,
        spec,
        config.engine.max_lora_rank,
        config.max_adapter_bytes,
        max_disk_bytes=disk_cache_bytes,
        busy=engine.is_loading,
    )
    limits = RequestLimits(
        max_tokens_limit=config.max_tokens_limit,
        default_max_tokens=config.effective_default_max_tokens,
        vocab_size=spec.vocab_size,
        max_model_len=engine.max_model_len,
    )
    activity = AdapterActivity()
    generation = GenerationService(
        engine,
        control_plane,
        artifacts,
        usage,
        metrics,
        state,
        limits,
        reservation_s=config.request_id_reservation_s,
        activity=activity,
        max_pending_merges_per_tenant=config.max_pending_merges_per_tenant,
        max_streams_per_tenant=config.resolved_max_streams_per_tenant,
    )
    metrics.watch_routing_load(
        lambda: _engine_load(engine), activity, max_lora=config.engine.num_adapter_slots
    )
    inference.serve(generation)
    http = None
    if config.http_listen:
        api = OpenAIApi(
            generation,
            metrics,
            state,
            chat_template=load_chat_template(Path(config.model_dir)),
            list_models=control_plane_catalog(control_plane, spec.name),
            created=_model_created(Path(config.model_dir)),
        )
        http = HttpServer(
            build_app(api, metrics=config.http_metrics),
            config.http_listen,
            max_connections=_http_connection_cap(config),
        )
        try:
            await http.start()
        except ListenError:
            raise
        except OSError as error:  # its bind: one line naming the address, as the gRPC listener's
            reason = error.strerror or str(error)
            raise listen_error(config.http_listen, "--http-listen (OPENLORA_HTTP_LISTEN)", reason) from None

    running = RunningWorker(
        config=config,
        port=port,
        server=server,
        engine=engine,
        control_plane=control_plane,
        usage=usage,
        health=health_servicer,
        state=state,
        metrics=metrics,
        http=http,
        instance_id=instance_id,
    )
    await running._set_health(health_pb2.HealthCheckResponse.SERVING)

    def stats() -> tuple[int, int, list[str]]:
        return engine.num_running, engine.num_waiting, sorted(engine.resident_adapter_keys())

    def residency() -> tuple[int, int, list[str], list[str]]:
        return (
            engine.num_running,
            engine.num_waiting,
            engine.resident_adapter_keys(),
            engine.host_adapter_keys(),
        )

    loop = asyncio.get_running_loop()

    def on_hint(hint: Hint) -> None:
        if hint.kind == "revoke":
            control_plane.forget_api_key_id(hint.api_key_id)
            generation.end_streams_of_key(hint.api_key_id)
            return
        if hint.kind == "invalidate" and hint.key_only and hint.sha256:
            # Its content is still served under other cache keys (another tenant's private copy, a public
            # adapter): only the deleted adapter's own key goes, with the merges built from it. Kept, it
            # made the deleter's next upload of the same bytes warm, telling it that someone holds them.
            control_plane.forget_adapter(hint.adapter_id)
            generation.drop_keep_warm(hint.adapter_id)
            key = hint.cache_key
            generation.drop_merges_of_key(key)
            artifacts.discard(key)
            task = loop.create_task(apply_hint(engine, hint, artifacts))
            running._hint_tasks.add(task)
            task.add_done_callback(_hint_done(running._hint_tasks, hint))
            return
        if hint.kind == "invalidate":
            # Always forget the adapter's cached answers; its content only when no adapter serves it any
            # more (the control plane then names the sha256): others may share content-addressed files.
            control_plane.forget_adapter(hint.adapter_id, hint.sha256)
            generation.drop_keep_warm(hint.adapter_id)
            # The merges built from the content a deleted or replaced adapter served are dropped too.
            for source in sorted({hint.source_sha256, hint.sha256} - {""}):
                generation.drop_merges_of(source)
            if hint.sha256:  # every scope's copy (openlora/cache_scope.py)
                for key in artifacts.keys_of(hint.sha256):
                    artifacts.discard(key)
        if not hint.sha256:
            return
        # The engine side (invalidate at once, demote, prewarm: fetch to disk then load) runs beside
        # the listener, so a slow artifact fetch never holds up the hints behind it.
        task = loop.create_task(apply_hint(engine, hint, artifacts))
        running._hint_tasks.add(task)
        task.add_done_callback(_hint_done(running._hint_tasks, hint))

    def counted(name: str):
        return metrics.background_errors.labels(name).inc

    # Each loop survives its own exceptions (logged, counted); keep_running starts it again if it dies.
    running._tasks = [
        loop.create_task(
            keep_running(
                "heartbeat",
                lambda: control_plane.run_heartbeats(
                    state.worker_id,
                    heartbeat_s,
                    stats,
                    register,
                    on_error=counted("heartbeat"),
                    instance_id=instance_id,
                    on_superseded=running.lose_identity,
                ),
                counted("heartbeat"),
            )
        ),
        loop.create_task(_watch_engine(running, counted("engine_watch"))),
    ]
    if config.redis_url:
        running._tasks.append(
            loop.create_task(
                keep_running(
                    "hints",
                    lambda: listen_for_hints(config.redis_url, on_hint, on_error=counted("hints")),
                    counted("hints"),
                )
            )
        )
        running._tasks.append(
            loop.create_task(
                keep_running(
                    "residency",
                    lambda: publish_residency(
                        config.redis_url, state.worker_id, residency, interval_s=config.residency_interval_s
                    ),
                    counted("residency"),
                )
            )
        )
    return running


def _hint_done(pending: set[asyncio.Task], hint: Hint):
    def done(task: asyncio.Task) -> None:
        pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("%s hint for %s not applied: %s", hint.kind, hint.sha256[:12], task.exception())

    return done


async def _release_stale_request_ids(control_plane: ControlPlaneClient, worker_id: str, usage) -> None:
    """Before serving: gives back the request id reservations this worker's previous run left (its streams
    died with it), so that a retry of one that delivered nothing is served at once rather than refused
    until it lapses. The ids its spool still bills stay reserved. A failure only leaves them to lapse."""
    keep = usage.pending_keys()
    if len(keep) > MAX_KEPT_REQUEST_IDS:
        return  # a long outage's spool: they lapse on their own
    try:
        released = await control_plane.release_worker_request_ids(worker_id, keep)
    except ControlPlaneError as error:
        log.warning(
            "request id reservations of the previous run not released (they lapse): %s", error.message
        )
        return
    if released:
        log.info("released %d request id reservations left by this worker's previous run", released)


def _model_created(model_dir: Path) -> int:
    """The base model's `created` on /v1/models: when its config.json was written (Unix seconds), so that
    it stays the same across restarts as an adapter's does; the time now where it cannot be read."""
    try:
        return int((model_dir / "config.json").stat().st_mtime)
    except OSError:
        return int(time.time())


async def _register_with_retry(register) -> float:
    delay_s = 0.2
    while True:
        try:
            return await register()
        except ControlPlaneError as error:
            if error.code != grpc.StatusCode.UNAVAILABLE:
                raise
            log.warning("control plane not reachable yet (%s); retrying in %.1fs", error.message, delay_s)
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, REGISTER_RETRY_MAX_S)


async def _watch_engine(running: RunningWorker, on_error: Callable[[], None]) -> None:
    """Updates the running/waiting gauges; turns health NOT_SERVING when the engine loop died (for good),
    and while the usage spool cannot be written (SERVING again once a probe write succeeds). A round that
    raises is logged and counted (`on_error`), and the watch goes on with what it knew: it is the only
    thing that reports a dead engine, and it was a task that one exception ended for good."""
    watch = _EngineWatch(running)
    while True:
        await asyncio.sleep(ENGINE_WATCH_INTERVAL_S)
        try:
            if await watch.round():
                return
        except Exception:
            log.exception("engine watch round failed; the watch goes on")
            on_error()


class _EngineWatch:
    def __init__(self, running: RunningWorker) -> None:
        self._running = running
        self._spool_failed = False

    async def round(self) -> bool:
        """One look; True once the engine loop has stopped for good (health set NOT_SERVING)."""
        running = self._running
        engine, usage = running.engine, running.usage
        running.metrics.running.set(engine.num_running)
        running.metrics.waiting.set(engine.num_waiting)
        if running.state.draining:
            return False
        if not engine.is_running:
            log.error("the engine loop stopped; health NOT_SERVING")
            await running._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
            return True
        if usage.write_error is None and not self._spool_failed:
            return False
        writable = await asyncio.to_thread(usage.probe_writable)
        if writable == self._spool_failed and not running.state.draining:
            self._spool_failed = not writable
            if self._spool_failed:
                log.error("the usage spool cannot be written (%s); health NOT_SERVING", usage.write_error)
            else:
                log.info("the usage spool is writable again; health SERVING")
            await running._set_health(
                health_pb2.HealthCheckResponse.NOT_SERVING
                if self._spool_failed
                else health_pb2.HealthCheckResponse.SERVING
            )
        return False


def _engine_load(engine) -> EngineLoad:
    """The engine's load for the routing gauges; called from the scraping thread (each value is one
    read of a plain attribute or length)."""
    return EngineLoad(engine.num_running, engine.num_waiting, engine.kv_cache_usage)


def _read_worker_id(config: WorkerConfig) -> str:
    """The worker id recorded in the state dir, or "" (none yet, or a damaged file: the worker registers
    as a new one, with a warning). The worker writes only ids the control plane made (32 hex digits), an
    operator may have written one of their own; a file zeroed by a power loss, or bytes that are not text,
    was sent as it stood: refused at every start (INVALID_ARGUMENT naming worker_id), or a traceback."""
    path = config.worker_id_path
    text = path.read_bytes().decode("utf-8", "replace").strip() if path.exists() else ""
    if text and not _WORKER_ID_FILE_TEXT.fullmatch(text):
        log.warning("%s is damaged (%r is not a worker id): registering as a new worker", path, text[:40])
        return ""
    return text


def _instance_place(path: Path) -> dict[str, str]:
    """Where a state dir's runs run: this host and the state dir's own path."""
    return {"host": socket.gethostname(), "state_dir": str(path.parent.resolve())}


def _write_whole(path: Path, text: str) -> None:
    """Writes a state-dir file whole or not at all: a temporary file renamed over it (a crash while it is
    written leaves the previous file or none, never one cut short). StateDirUnwritable when the disk takes
    no write (what was begun is removed: it would hold the space the next try needs)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise StateDirUnwritable(path.parent, error) from None


def _write_instance(path: Path, instance_id: str) -> None:
    """Records `instance_id` as the state dir's last run (a damaged file names no run: `_previous_instance`)."""
    _write_whole(path, json.dumps({"instance": instance_id, **_instance_place(path)}))


def _previous_instance(path: Path) -> str:
    """The run that registered this state dir's worker last, when it ran here: a copy of the dir (taken
    while that run served, on another host or at another path) names no previous run, so the control plane
    refuses it the id while the run it was copied from is live, instead of handing the id over to it. A
    damaged record (cut short, zeroed by a power loss, not UTF-8) names none either: sent as it was, the
    control plane refused it (NUL characters, past 64 characters) and the worker never started again."""
    text = path.read_bytes().decode("utf-8", "replace").strip() if path.exists() else ""
    if _INSTANCE_ID.fullmatch(text):
        return text  # written by an earlier version: the bare id
    try:
        recorded = json.loads(text) if text else {}
    except ValueError:
        return ""
    instance = recorded.get("instance") if isinstance(recorded, dict) else None
    if not isinstance(instance, str) or not _INSTANCE_ID.fullmatch(instance):
        return ""
    place = _instance_place(path)
    return recorded["instance"] if all(recorded.get(k) == v for k, v in place.items()) else ""


async def _serve_until_signalled(config: WorkerConfig) -> int:
    """Serves until SIGTERM/SIGINT (drains, returns 0), until the engine loop dies (health NOT_SERVING,
    what can drain drains, returns ENGINE_DEAD_EXIT_CODE so a supervisor restarts it), or until another
    process holds its worker id (drains, returns IDENTITY_LOST_EXIT_CODE)."""
    running = await serve_worker(config)
    settle_heap()
    openai = f" openai={running.openai_base_url}" if running.http is not None else ""
    print(f"worker serving inference={running.address} id={running.worker_id}{openai}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    engine = running.engine
    while not stop.is_set() and engine.is_running and not running.lost_identity:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), ENGINE_WATCH_INTERVAL_S)
    if running.lost_identity:
        await running.stop(config.drain_grace_s)
        log.error(
            "worker exits with status %d: another process registered worker id %s (%s)",
            IDENTITY_LOST_EXIT_CODE,
            running.worker_id,
            running.lost_identity,
        )
        return IDENTITY_LOST_EXIT_CODE
    if stop.is_set():
        log.info("signal received: draining")
        await running.stop(config.drain_grace_s)
        return 0
    log.error("the engine loop stopped (%s); health NOT_SERVING, exiting", getattr(engine, "error", None))
    await running._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
    await running.stop(config.drain_grace_s)
    log.error("worker exits with status %d: its engine cannot go on", ENGINE_DEAD_EXIT_CODE)
    return ENGINE_DEAD_EXIT_CODE


def lock_state_dir(state_dir: Path | str) -> int:
    """Takes an exclusive lock on the state dir itself for this process (the kernel drops it however the
    process ends) and writes the process's pid to STATE_DIR/worker.pid; returns the directory's open file,
    which holds the lock until `unlock_state_dir`. The lock is the directory's, not a file's, so that the
    pid file can be removed as the process ends and a start refused later leaves nothing behind.
    StateDirInUse names the pid of the worker that holds it."""
    path = Path(state_dir)
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        try:
            holder = (path / STATE_DIR_PID_FILE).read_text(errors="replace").strip()[:32] or "unknown"
        except OSError:
            holder = "unknown"
        raise StateDirInUse(
            f"another worker (pid {holder}) is using the state directory {state_dir}: give this one a "
            "state directory of its own (--state-dir, OPENLORA_STATE_DIR)"
        ) from None
    try:
        (path / STATE_DIR_PID_FILE).write_text(f"{os.getpid()}\n")
    except OSError as error:
        with contextlib.suppress(OSError):
            (path / STATE_DIR_PID_FILE).unlink(missing_ok=True)  # created, then nothing written to it
        os.close(fd)
        raise StateDirUnwritable(state_dir, error) from None
    return fd


def unlock_state_dir(state_dir: Path | str, fd: int) -> None:
    """Ends what `lock_state_dir` began: the pid file goes, then the lock."""
    with contextlib.suppress(OSError):
        (Path(state_dir) / STATE_DIR_PID_FILE).unlink()
    os.close(fd)


def run_worker(config: WorkerConfig) -> int:
    """Process entry: serves until SIGTERM/SIGINT, drains, returns the exit status. The state dir is the
    process's alone while it runs (StateDirInUse otherwise, before anything starts)."""
    lock_fd = lock_state_dir(config.state_dir)
    try:
        return asyncio.run(_serve_until_signalled(config))
    finally:
        unlock_state_dir(config.state_dir, lock_fd)
