"""InferenceService.Generate: authorise -> validate -> resolve artifacts -> engine -> stream.

Thin by design: the checks live in validation.py, authorisation in control_plane_client.py, artifacts
in artifact_store.py, billing in usage_reporter.py. Every domain error becomes a status code in one
place (`status_for`); nothing a caller can cause becomes INTERNAL.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from data_plane.engine.errors import AdapterLoadError, EngineDead, InvalidRequest, QueueFull, StepFailed
from data_plane.engine.request import AdapterRef, EngineRequest, SamplingOptions
from data_plane.server.artifact_store import ArtifactError, ArtifactRejected, ArtifactStore
from data_plane.server.control_plane_client import Authorization, ControlPlaneClient, ControlPlaneError
from data_plane.server.metrics import WorkerMetrics
from data_plane.server.usage_reporter import CHECKPOINT_FINISH_REASON, UsageRecord, UsageReporter
from data_plane.server.validation import (
    RequestFieldError,
    RequestLimits,
    ValidRequest,
    check_prompt_length,
    check_request,
    requested_adapter_names,
)
from openlora.v1 import inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)

_FINISH_REASONS = {
    "stop": inference_pb2.FINISH_REASON_STOP,
    "length": inference_pb2.FINISH_REASON_LENGTH,
    "abort": inference_pb2.FINISH_REASON_ABORT,
}
_CACHE_TIERS = {
    "none": inference_pb2.CACHE_TIER_NONE,
    "device": inference_pb2.CACHE_TIER_DEVICE,
    "host": inference_pb2.CACHE_TIER_HOST,
    "disk": inference_pb2.CACHE_TIER_DISK,
    "remote": inference_pb2.CACHE_TIER_REMOTE,
}


class Draining(Exception):
    """The worker is shutting down and takes no new calls."""


class MissingCredentials(Exception):
    """The call carries no `authorization: Bearer <key>` metadata."""


class MissingScope(Exception):
    """The key is valid but may not call InferenceService."""


class DuplicateRequest(Exception):
    """A call with the same tenant and request id is still in flight."""


class RequestIdUsed(Exception):
    """A finished call of this tenant was billed under this client request id (not yet reported)."""


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status code and message for a domain error; None for a fault of the worker itself."""
    if isinstance(error, RequestFieldError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    if isinstance(error, InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    if isinstance(error, AdapterLoadError):
        return grpc.StatusCode.FAILED_PRECONDITION, f"adapter refused: {error}"
    if isinstance(error, ArtifactRejected):
        return grpc.StatusCode.FAILED_PRECONDITION, f"adapter refused by this worker: {error}"
    if isinstance(error, ArtifactError):
        return grpc.StatusCode.UNAVAILABLE, f"adapter download failed, retry: {error}"
    if isinstance(error, EngineDead):
        return grpc.StatusCode.UNAVAILABLE, "the worker's engine stopped; retry on another worker"
    if isinstance(error, StepFailed):  # a fault of the worker, logged with its traceback by the engine
        return grpc.StatusCode.INTERNAL, f"{error}; the worker logged the fault"
    if isinstance(error, QueueFull):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "the worker's waiting queue is full; retry later"
    if isinstance(error, ControlPlaneError):
        return error.code, error.message
    if isinstance(error, Draining):
        return grpc.StatusCode.UNAVAILABLE, "the worker is draining; retry on another worker"
    if isinstance(error, MissingCredentials):
        return grpc.StatusCode.UNAUTHENTICATED, "missing metadata 'authorization: Bearer <api key>'"
    if isinstance(error, MissingScope):
        return grpc.StatusCode.PERMISSION_DENIED, "the api key lacks the infer scope"
    if isinstance(error, DuplicateRequest):
        return grpc.StatusCode.ALREADY_EXISTS, f"request_id {error.args[0]!r} is already in flight"
    if isinstance(error, RequestIdUsed):
        return (
            grpc.StatusCode.ALREADY_EXISTS,
            f"request_id {error.args[0]!r} was already served and billed; send a new request id",
        )
    return None


@dataclass
class WorkerState:
    worker_id: str = ""
    base_model: str = ""
    draining: bool = False
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def enter(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.idle.set()


@dataclass
class _Progress:
    """What was actually handed to the transport, for billing and metrics."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_ms: float = 0.0
    ttft_ms: float = 0.0
    total_ms: float = 0.0
    finish_reason: str = "abort"
    last_token_at: float | None = None
    # (adapter id, weight) of the request's adapters, for billing.
    adapters: tuple[tuple[str, float], ...] = ()


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(
        self,
        engine,
        control_plane: ControlPlaneClient,
        artifacts: ArtifactStore,
        usage: UsageReporter,
        metrics: WorkerMetrics,
        state: WorkerState,
        limits: RequestLimits,
        reservation_s: float = 120.0,
    ) -> None:
        self._engine = engine
        self._cp = control_plane
        self._artifacts = artifacts
        self._usage = usage
        self._metrics = metrics
        self._state = state
        self._limits = limits
        # (tenant id, request id) of the calls streaming now.
        self._in_flight: set[tuple[str, str]] = set()
        # How long the control plane holds a client request id reserved for a stream of this worker.
        self._reservation_ms = int(reservation_s * 1000)
        # Reservations being given back (kept referenced until done).
        self._releases: set[asyncio.Task] = set()

    async def Generate(self, request, context) -> AsyncIterator[inference_pb2.GenerateResponse]:
        """Streams one completion: a message per engine step, the last with finish_reason, usage, timing."""
        self._state.enter()
        code = "OK"
        try:
            async for response in self._generate(request, context):
                yield response
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            mapped = status_for(error)
            if mapped is None:
                log.exception("Generate failed")
                mapped = (grpc.StatusCode.INTERNAL, "internal error")
            code = mapped[0].name
            await context.abort(*mapped)
        finally:
            self._metrics.requests.labels(code).inc()
            self._state.leave()

    async def _generate(self, request, context) -> AsyncIterator[inference_pb2.GenerateResponse]:
        arrival = time.monotonic()
        if self._state.draining:
            raise Draining()
        api_key = _bearer_key(context)
        names = requested_adapter_names(request)
        auth = await self._authorize(api_key, names)
        if not auth.can_infer:
            raise MissingScope()
        valid = check_request(request, self._limits)
        request_id = valid.request_id or uuid.uuid4().hex
        # One run per (tenant, request id) at a time: a duplicate in flight would stream a second answer
        # billed once. A call that ended billed keeps its id used (below); one that streamed nothing was
        # not billed, and a retry under the same id is served.
        claim = (auth.tenant_id, request_id)
        if claim in self._in_flight:
            raise DuplicateRequest(request_id)
        self._in_flight.add(claim)
        reserved = False
        try:
            if valid.request_id:
                reserved = await self._check_request_id_unused(auth.tenant_id, request_id)
            prompt_ids = await self._prompt_ids(valid)
            check_prompt_length(len(prompt_ids), self._limits)

            # Authorize answers parallel to the names asked for (validation refused duplicates).
            by_name = dict(zip(names, auth.adapters, strict=True))
            for adapter in auth.adapters:
                if adapter.keep_warm:
                    self._engine.set_keep_warm(adapter.sha256, True)
            fetch_started = time.monotonic()
            adapter_refs, tier = await self._resolve(valid, by_name)
            fetch_ms = (time.monotonic() - fetch_started) * 1000
            # Held on local disk (the disk budget never removes them) until the stream ends.
            held = [ref.key for ref in adapter_refs]
            try:
                engine_request = EngineRequest(
                    # The engine's id is private: two calls may carry the same client request id.
                    request_id=uuid.uuid4().hex,
                    prompt_token_ids=prompt_ids,
                    sampling=SamplingOptions(
                        temperature=valid.temperature,
                        top_p=valid.top_p,
                        top_k=valid.top_k,
                        max_tokens=valid.max_tokens,
                        seed=valid.seed,
                        stop=valid.stop,
                        repetition_penalty=valid.repetition_penalty,
                        logprobs=valid.logprobs,
                    ),
                    adapters=adapter_refs,
                    arrival_time=arrival,
                )
                progress = _Progress(
                    prompt_tokens=len(prompt_ids),
                    adapters=tuple((by_name[name].adapter_id, weight) for name, weight in valid.adapters),
                )
                outputs = self._engine.generate(engine_request)
                # The reporter's timer spools the count delivered so far while the stream runs.
                stream = self._usage.track(
                    lambda: self._usage_record(request_id, auth, progress, arrival, CHECKPOINT_FINISH_REASON)
                )
                try:
                    async for out in outputs:
                        if out.error is not None:
                            raise out.error
                        if not out.finished and not out.new_token_ids and not out.new_text:
                            continue  # nothing new to send
                        response = inference_pb2.GenerateResponse(
                            request_id=request_id,
                            text=out.new_text,
                            token_ids=out.new_token_ids,
                            logprobs=out.new_logprobs or [] if valid.logprobs else [],
                        )
                        if out.finished:
                            self._finish(response, out, progress, tier, fetch_ms)
                        yield response
                        # Counted only once the transport took the message: that is what the caller received.
                        self._count_streamed(progress, out, arrival)
                        if out.finished:
                            progress.finish_reason = out.finish_reason or "stop"
                            break
                except (asyncio.CancelledError, GeneratorExit):
                    progress.finish_reason = "abort"
                    raise
                except BaseException:
                    progress.finish_reason = "error"
                    raise
                finally:
                    await _close(outputs)
                    try:
                        self._record_usage(request_id, auth, progress, arrival)
                    finally:  # after the final record: its last checkpoint stays in the spool until then
                        self._usage.untrack(stream)
            finally:
                self._artifacts.release(held)
        finally:
            self._in_flight.discard(claim)
            if reserved and not self._usage.has_pending(auth.tenant_id, request_id):
                # Nothing of this stream is waiting to be billed: either nothing was delivered (a retry
                # under this id must be served) or its usage already reached the control plane (which
                # refuses the id on its own). Given back beside the call; the expiry covers a failure.
                self._release_request_id(auth.tenant_id, request_id)

    async def _authorize(self, api_key: str, names: tuple[str, ...]) -> Authorization:
        try:
            return await self._cp.authorize(api_key, names, self._state.base_model)
        except ControlPlaneError as error:
            if error.code == grpc.StatusCode.NOT_FOUND and names:
                # This key's view of a name changed: forget only its own answers for those names. Names
                # are unique per tenant only, so nothing else is touched: not other keys' answers, not the
                # artifact, not the engine (content invalidation comes from the control plane's hints).
                self._cp.forget_names(api_key, names)
            raise

    async def _check_request_id_unused(self, tenant_id: str, request_id: str) -> bool:
        """Reserves a client request id for this stream at the control plane (atomic across workers);
        refuses one already billed or served elsewhere now: served again, it would be free. Usage still
        in the spool is unknown to the control plane, so the spool is asked first. Returns whether the
        id was reserved: with the control plane unreachable the call goes on unreserved (counted), kept
        from double billing by the usage key; only this worker's in-flight set stops duplicates then."""
        if self._usage.has_pending(tenant_id, request_id):
            raise RequestIdUsed(request_id)
        try:
            await self._cp.reserve_request_id(
                tenant_id, request_id, self._state.worker_id, self._reservation_ms
            )
        except ControlPlaneError as error:
            if error.code != grpc.StatusCode.UNAVAILABLE:
                raise
            self._metrics.request_id_unchecked.inc()
            log.warning("request id served unreserved (control plane unavailable): %s", error.message)
            return False
        return True

    def _release_request_id(self, tenant_id: str, request_id: str) -> None:
        async def release() -> None:
            try:
                await self._cp.release_request_id(tenant_id, request_id, self._state.worker_id)
            except ControlPlaneError as error:
                log.warning("request id reservation not released (it expires): %s", error.message)

        task = asyncio.get_running_loop().create_task(release())
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _prompt_ids(self, valid: ValidRequest) -> list[int]:
        if valid.prompt_token_ids is not None:
            return list(valid.prompt_token_ids)
        tokenizer = self._engine.tokenizer
        if tokenizer is None:
            raise RequestFieldError(
                "prompt", "cannot be text: this model has no tokenizer; send prompt_token_ids"
            )
        return list(await asyncio.to_thread(tokenizer.encode, valid.prompt))

    async def _resolve(self, valid: ValidRequest, by_name) -> tuple[tuple[AdapterRef, ...], str]:
        if not valid.adapters:
            self._metrics.cache_lookups.labels("none").inc()
            return (), "none"
        resolved = [(by_name[name], weight) for name, weight in valid.adapters]
        results = await asyncio.gather(
            *(self._artifacts.ensure(a.sha256, hold=True) for a, _ in resolved), return_exceptions=True
        )
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:  # each ensure that failed gave back its own hold; give back the others'
            self._artifacts.release(r.sha256 for r in results if not isinstance(r, BaseException))
            raise failed[0]
        locals_ = results
        refs = tuple(
            AdapterRef(key=a.sha256, path=local.path, weight=weight)
            for (a, weight), local in zip(resolved, locals_, strict=True)
        )
        tier = "remote" if any(local.tier == "remote" for local in locals_) else "disk"
        return refs, tier

    def _finish(
        self, response: inference_pb2.GenerateResponse, out, progress: _Progress, tier: str, fetch_ms: float
    ) -> None:
        """Fills the last message's finish reason, usage and timing; notes the timing for billing."""
        # A fetch from the control plane is the slowest tier; otherwise the engine knows.
        final_tier = "remote" if tier == "remote" else out.cache_tier or "none"
        response.finish_reason = _FINISH_REASONS.get(out.finish_reason or "abort", 0)
        response.usage.prompt_tokens = out.prompt_tokens
        response.usage.completion_tokens = progress.completion_tokens + len(out.new_token_ids)
        response.timing.queue_ms = out.queue_ms
        response.timing.adapter_load_ms = out.adapter_load_ms + (fetch_ms if tier == "remote" else 0)
        response.timing.ttft_ms = out.ttft_ms
        response.timing.total_ms = out.total_ms
        response.timing.cache_tier = _CACHE_TIERS[final_tier]
        progress.queue_ms, progress.ttft_ms, progress.total_ms = out.queue_ms, out.ttft_ms, out.total_ms
        self._observe_adapter(final_tier, response.timing.adapter_load_ms)

    def _count_streamed(self, progress: _Progress, out, arrival: float) -> None:
        n = len(out.new_token_ids)
        if not n:
            return
        now = time.monotonic()
        if progress.completion_tokens == 0:
            self._metrics.ttft_s.observe(now - arrival)
        elif progress.last_token_at is not None:
            gap_s = (now - progress.last_token_at) / n
            for _ in range(n):
                self._metrics.inter_token_s.observe(gap_s)
        progress.last_token_at = now
        progress.completion_tokens += n
        self._metrics.tokens_generated.inc(n)

    def _observe_adapter(self, tier: str, load_ms: float) -> None:
        self._metrics.cache_lookups.labels(tier).inc()
        if tier != "none":
            self._metrics.adapter_load_s.labels(tier).observe(load_ms / 1000)

    def _record_usage(
        self, request_id: str, auth: Authorization, progress: _Progress, arrival: float
    ) -> None:
        total_ms = progress.total_ms or (time.monotonic() - arrival) * 1000
        self._metrics.e2e_s.observe(total_ms / 1000)
        if progress.queue_ms:
            self._metrics.queue_s.observe(progress.queue_ms / 1000)
        record = self._usage_record(request_id, auth, progress, arrival, progress.finish_reason)
        if record is not None:
            self._usage.record(record)

    def _usage_record(
        self, request_id: str, auth: Authorization, progress: _Progress, arrival: float, finish_reason: str
    ) -> UsageRecord | None:
        """The stream's billing record as of now (a checkpoint while it runs); None when nothing was
        received: nothing to bill."""
        if progress.completion_tokens == 0:
            return None
        return UsageRecord(
            request_id=request_id,
            tenant_id=auth.tenant_id,
            adapters=progress.adapters,
            worker_id=self._state.worker_id,
            base_model=self._state.base_model,
            prompt_tokens=progress.prompt_tokens,
            completion_tokens=progress.completion_tokens,
            queue_ms=progress.queue_ms,
            ttft_ms=progress.ttft_ms,
            total_ms=progress.total_ms or (time.monotonic() - arrival) * 1000,
            finished_at=time.time(),
            finish_reason=finish_reason,
        )


def _bearer_key(context) -> str:
    """The key of `authorization: Bearer <key>`; the scheme is case-insensitive, as on the control plane."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    raise MissingCredentials()


async def _close(outputs) -> None:
    aclose = getattr(outputs, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:  # closing must never hide the call's own outcome
            log.exception("closing the engine stream failed")
