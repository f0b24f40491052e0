"""Generation, whatever the transport: authorise -> validate -> tokenize, resolve artifacts -> engine ->
an async iterator of `Chunk`s; billing, usage checkpoints and artifact holds in its `finally`. A client
request id is reserved at the control plane beside all of that after validation; the first chunk waits
for the answer. A chunk holds what the engine made since the caller took the previous one: one step's
tokens when it keeps up, several when it lags (the first token always alone).

The gRPC servicer and the OpenAI-compatible HTTP app both call `GenerationService.generate` and only
convert: the same keys, scopes, limits, idempotency and billing hold for both. A chunk is counted as
delivered (billed, metered) as it is handed to the caller, the transport: a cancellation can land while the
transport writes it, and what reached the client then cannot be told, so it is billed rather than given
away. A caller must iterate to the end (the last chunk carries `finish`), or close the iterator to cancel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
from cachetools import TTLCache

from data_plane.engine.errors import AdapterLoadError, EngineError
from data_plane.engine.request import AdapterRef, EngineRequest, SamplingOptions
from data_plane.fusion.builder import MergeBuildError
from data_plane.fusion.spec import MergeSpec
from data_plane.fusion.store import MAX_PENDING_BUILDS_PER_TENANT, MergeStore
from data_plane.server.artifact_store import ArtifactRejected, ArtifactStore, default_disk_cache_bytes
from data_plane.server.control_plane_client import (
    AUTHORIZE_TIMEOUT_S,
    Authorization,
    ControlPlaneClient,
    ControlPlaneError,
    ResolvedAdapter,
)
from data_plane.server.ensemble_request import billed_adapters, ensemble_of
from data_plane.server.errors import (
    Draining,
    DuplicateRequest,
    KeyRevoked,
    LocalCopyFailed,
    MissingCredentials,
    MissingScope,
    RequestIdUsed,
    TenantStreamLimit,
    UsageUnrecordable,
)
from data_plane.server.metrics import AdapterActivity, WorkerMetrics
from data_plane.server.named_mix import expand_named_mix, named_mix_error
from data_plane.server.usage_reporter import (
    CHECKPOINT_FINISH_REASON,
    UsageRecord,
    UsageReporter,
    request_kind,
)
from data_plane.server.validation import RequestFieldError, RequestLimits, ValidRequest, check_prompt_length
from data_plane.tokenizer import PromptTooLong
from openlora.cache_scope import cache_scope

log = logging.getLogger(__name__)
# Keys remembered as dropped after a failed load (a damaged copy), the oldest forgotten first.
MAX_DROPPED_AFTER_FAILED_LOAD = 1024
_MAX_REVOKED_KEY_IDS = 4096  # revoked lately (`GenerationService._revoked_key_ids`): past it, oldest first


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


@dataclass(frozen=True)
class Finish:
    """What the last chunk of a stream carries."""

    reason: str  # "stop" | "length" | "abort"
    prompt_tokens: int
    completion_tokens: int
    queue_ms: float
    adapter_load_ms: float
    ttft_ms: float
    total_ms: float
    cache_tier: str  # "none" | "device" | "host" | "disk" | "remote"


@dataclass(frozen=True)
class Chunk:
    """New output of one engine step (or a few)."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[float]  # parallel to token_ids when asked for, else empty
    finish: Finish | None = None
    # Parallel to logprobs: where each token's text begins in the output text (RequestOutput's).
    text_offsets: list[int] = field(default_factory=list)


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
    # Tokens billed per token run: an ensemble of K members runs each token K times.
    billed_per_token: int = 1
    request_kind: str = "single"  # usage_reporter.request_kind
    mix_name: str = ""  # the saved mix the request named


@dataclass(eq=False)
class _KeyCall:
    """A call of an api key, from its authorization to its end (`end_streams_of_key`)."""

    engine_request_id: str = ""  # set once it reaches the engine
    revoked: bool = False  # the key was revoked before it reached the engine: it ends there


@dataclass
class _Reservation:
    """How long the control plane holds a stream's client request id for it. A stream hands over a chunk
    only while it holds its id: a worker paused (SIGSTOP, a stalled loop) past `until` may find the id
    served by another worker since, and its chunks would be a second answer billed once."""

    until: float | None = None  # time.monotonic() the reservation lapses at; None: not reserved
    lost: ControlPlaneError | None = None  # a renewal found the id taken: the stream ends on it


class GenerationService:
    def __init__(
        self,
        engine,
        control_plane: ControlPlaneClient,
        artifacts: ArtifactStore,
        usage: UsageReporter,
        metrics: WorkerMetrics,
        state: WorkerState,
        limits: RequestLimits,
        reservation_s: float = 30.0,
        activity: AdapterActivity | None = None,
        merges: MergeStore | None = None,
        max_pending_merges_per_tenant: int = MAX_PENDING_BUILDS_PER_TENANT,
        max_streams_per_tenant: int | None = None,
    ) -> None:
        self._engine = engine
        self._cp = control_plane
        self._artifacts = artifacts
        self._usage = usage
        self._metrics = metrics
        self._state = state
        self.limits = limits
        self.activity = activity or AdapterActivity()
        # Derived adapters of TIES/DARE/magnitude-prune mixes (made on first use when not given).
        self._merges = merges
        self._max_pending_merges_per_tenant = max_pending_merges_per_tenant
        # (tenant id, request id) of the calls streaming now.
        self._in_flight: set[tuple[str, str]] = set()
        # Streams per tenant now, against the cap one tenant may hold (None: no cap).
        self._tenant_streams: Counter[str] = Counter()
        # The calls running now, from their authorization on (preparing too: a fetch or a merge build may
        # take seconds), by the id of the api key that made them (a revoked key's calls end:
        # `end_streams_of_key`).
        self._key_streams: dict[str, set[_KeyCall]] = {}
        # The ids of the api keys revoked lately: an Authorize the control plane answered before the
        # revocation may reach this worker after its hint (within the call's deadline), and the call it
        # starts was in none of the key's streams that the hint ended.
        self._revoked_key_ids: TTLCache[str, bool] = TTLCache(
            maxsize=_MAX_REVOKED_KEY_IDS, ttl=2 * AUTHORIZE_TIMEOUT_S, timer=time.monotonic
        )
        # adapter id -> the cache key it last asked the engine to keep warm: an owner turning keep-warm
        # off (or the name moving to other content) releases the key it held.
        self._keep_warm_keys: dict[str, str] = {}
        self._max_streams_per_tenant = max_streams_per_tenant
        # How long the control plane holds a client request id reserved for a stream of this worker.
        self._reservation_ms = int(reservation_s * 1000)
        # Reservations being given back (kept referenced until done).
        self._releases: set[asyncio.Task] = set()
        self._renewals: set[asyncio.Task] = set()  # request id reservations kept alive (`_renew_reservation`)
        # Keys whose copy on this disk failed to load and was dropped, until one of their calls succeeds:
        # a copy fetched or built again that fails the same way is refused, not retried without end.
        self._dropped_after_failed_load: OrderedDict[str, None] = OrderedDict()

    def end_streams_of_key(self, api_key_id: str) -> int:
        """Ends every stream the api key of this id is running (it was revoked) with UNAUTHENTICATED; each
        is billed for what it delivered. Returns how many."""
        if api_key_id:
            self._revoked_key_ids[api_key_id] = True
        calls = self._key_streams.get(api_key_id, set())
        for call in calls:
            call.revoked = True  # one still preparing ends as it reaches the engine
            if call.engine_request_id:
                self._engine.fail(call.engine_request_id, KeyRevoked())
        return len(calls)

    @property
    def base_model(self) -> str:
        return self._state.base_model

    @property
    def tokenizer(self):
        return self._engine.tokenizer

    def check_serving(self) -> None:
        """Raises Draining while the worker takes no new calls, UsageUnrecordable while its usage spool
        cannot be written (a call would fail at its first chunk's checkpoint, after its prefill)."""
        if self._state.draining:
            raise Draining()
        if self._usage.write_error is not None:
            raise UsageUnrecordable(self._usage.write_error)

    async def authorize(self, api_key: str | None, names: tuple[str, ...]) -> Authorization:
        """The key's tenant and the adapters `names` resolve to for it; raises MissingCredentials,
        MissingScope or the control plane's answer (NOT_FOUND for a name the key may not use)."""
        if not api_key:
            raise MissingCredentials()
        try:
            auth = await self._cp.authorize(api_key, names, self._state.base_model)
        except ControlPlaneError as error:
            if error.code == grpc.StatusCode.NOT_FOUND and names:
                # This key's view of a name changed: forget only its own answers for those names. Names
                # are unique per tenant only, so nothing else is touched: not other keys' answers, not the
                # artifact, not the engine (content invalidation comes from the control plane's hints).
                self._cp.forget_names(api_key, names)
            raise
        if not auth.can_infer:
            raise MissingScope()
        return auth

    async def authenticate(self, api_key: str | None) -> str:
        """Checks the key alone, before anything of its request is read: a key with an answer cached
        recently, for any names, passes at once (its call asks Authorize before anything is delivered);
        another is asked about (UNAUTHENTICATED, MissingScope as `authorize`). Returns the key's tenant
        id."""
        if not api_key:
            raise MissingCredentials()
        tenant_id = self._cp.tenant_of(api_key)
        if tenant_id is None:
            tenant_id = (await self.authorize(api_key, ())).tenant_id
        return tenant_id

    async def _confirm(self, api_key: str | None, names: tuple[str, ...], early: Authorization) -> None:
        """Asks Authorize again for a call started on the recent answer `early`: raises its refusal, or
        AuthorizationChanged when the fresh answer differs (another adapter content, scope or mix)."""
        try:
            fresh = await self.authorize(api_key, names)
        except Exception:
            self._metrics.early_start.labels("refused").inc()
            raise
        if fresh != early:
            raise AuthorizationChanged()
        self._metrics.early_start.labels("confirmed").inc()

    async def generate(
        self,
        api_key: str | None,
        names: tuple[str, ...],
        check: Callable[[], ValidRequest],
        whole: bool = False,
    ) -> AsyncIterator[Chunk]:
        """Streams one completion. `names` are the distinct adapter names the request mentions (they are
        authorised first); `check` validates the request once the key is known good. Raises the domain
        errors of `data_plane.server.errors` (and the engine's, the artifact store's, the control
        plane's); `errors.status_for` maps each.

        `whole`: the caller hands the output on only once it is complete (a non-streamed HTTP response),
        so a call cut short delivered nothing and is billed nothing, and no checkpoint is spooled.

        A call whose key and names have a recent answer that is no longer fresh (an adapter called once an
        hour always has) starts on it at once: tokenizing, resolving the adapters, the engine's adapter
        copy, queueing and prefill run while Authorize asks again. Nothing is delivered before the fresh
        answer; a refusal fails the call, and an answer that changed starts it over on the new one."""
        arrival = time.monotonic()
        self.check_serving()
        early = self._cp.recent_authorization(api_key, names) if api_key else None
        if early is not None and early.can_infer:
            try:  # AuthorizationChanged comes before any chunk: the check gates the first one
                async for chunk in self._generate(api_key, names, check, whole, arrival, early):
                    yield chunk
                return
            except AuthorizationChanged:
                self._metrics.early_start.labels("changed").inc()
                log.info("authorization changed while the call started early; starting over on the new one")
        async for chunk in self._generate(api_key, names, check, whole, arrival, None):
            yield chunk

    async def _generate(
        self,
        api_key: str | None,
        names: tuple[str, ...],
        check: Callable[[], ValidRequest],
        whole: bool,
        arrival: float,
        early: Authorization | None,
    ) -> AsyncIterator[Chunk]:
        """`generate` on a fresh answer (`early` None), or started on the recent answer `early` while its
        check runs beside the work (`_confirm`; raises AuthorizationChanged before any chunk)."""
        if early is None:
            auth, confirmed = await self.authorize(api_key, names), None
        else:
            auth = early
            confirmed = asyncio.ensure_future(self._confirm(api_key, names, early))
            confirmed.add_done_callback(_consume_error)  # a caller gone early never awaits it
        if auth.api_key_id in self._revoked_key_ids:  # answered before the revocation, arrived after it
            raise KeyRevoked()
        try:
            # A name that is a saved mix of the tenant turns into the request that mix stands for.
            valid, by_name = expand_named_mix(check(), names, auth, self.limits)
        except Exception:
            _raise_if_failed(await _settled(confirmed))  # a refused key says more than a field
            raise
        saved_mix = next((a.name for a in auth.adapters if a.mix is not None), "")
        async with contextlib.aclosing(
            self._serve(valid, by_name, auth, confirmed, whole, arrival)
        ) as chunks:
            try:
                async for chunk in chunks:
                    yield chunk
            except (RequestFieldError, EngineError, ArtifactRejected) as error:
                renamed = named_mix_error(error, saved_mix) if saved_mix else None
                if renamed is None:
                    raise
                raise renamed from None

    async def _serve(
        self,
        valid: ValidRequest,
        by_name,
        auth: Authorization,
        confirmed: asyncio.Future | None,
        whole: bool,
        arrival: float,
    ) -> AsyncIterator[Chunk]:
        """`_generate` once the request is checked (and a saved mix expanded): one run per (tenant, request
        id) at a time, within the tenant's stream share, with its request id reserved beside the work."""
        request_id = valid.request_id or uuid.uuid4().hex
        # One run per (tenant, request id) at a time: a duplicate in flight would stream a second answer
        # billed once. A call that ended billed keeps its id used (below); one that streamed nothing was
        # not billed, and a retry under the same id is served.
        claim = (auth.tenant_id, request_id)
        if claim in self._in_flight:
            _raise_if_failed(await _settled(confirmed))
            raise DuplicateRequest(request_id)
        cap = self._max_streams_per_tenant
        if cap is not None and self._tenant_streams[auth.tenant_id] >= cap:
            _raise_if_failed(await _settled(confirmed))
            raise TenantStreamLimit(cap)
        self._in_flight.add(claim)
        self._tenant_streams[auth.tenant_id] += 1
        call = _KeyCall()
        key_calls = self._key_streams.setdefault(auth.api_key_id, set()) if auth.api_key_id else set()
        key_calls.add(call)
        # The reservation is a control-plane round trip (a database write, queued behind every other call's
        # under a burst): it runs beside tokenizing, resolving the adapters, and the request's queueing and
        # prefill in the engine; nothing is delivered (so nothing billed) before it answered, and a refusal
        # aborts the engine request.
        held = _Reservation()
        reservation = (
            asyncio.ensure_future(self._check_request_id_unused(auth.tenant_id, request_id, held))
            if valid.request_id
            else None
        )
        # The first chunk waits for both checks: the key's fresh answer first, then the request id.
        gate = _in_order(confirmed, reservation)
        # A stream may run past the reservation's time to live: renewed while it runs and while its usage
        # waits in the spool, else another worker could serve the id again in full once it expired (both
        # answers billed once).
        ended = asyncio.Event()
        if reservation is not None:
            renewal = asyncio.ensure_future(
                self._renew_reservation(auth.tenant_id, request_id, reservation, ended, held)
            )
            self._renewals.add(renewal)
            renewal.add_done_callback(self._renewals.discard)
        try:
            try:
                prompt_ids, adapter_refs, tier, fetch_ms = await self._prepare(valid, by_name, auth.tenant_id)
            except Exception:
                # A refused key or id says more than whatever else failed (and was the first check before).
                _raise_if_failed(await _settled(gate))
                raise
            # Held on local disk (the disk budget never removes them) until the stream ends.
            held_keys = [ref.key for ref in adapter_refs]
            try:
                # Closed here, not by the garbage collector, when the caller stops early: its finally
                # records the usage at once.
                async with contextlib.aclosing(
                    self._run(
                        valid,
                        request_id,
                        auth,
                        prompt_ids,
                        adapter_refs,
                        by_name,
                        tier,
                        fetch_ms,
                        arrival,
                        whole,
                        gate,
                        call,
                        held,
                    )
                ) as chunks:
                    async for chunk in chunks:
                        yield chunk
                for key in held_keys:
                    self._dropped_after_failed_load.pop(key, None)
            except AdapterLoadError as error:
                # These files passed their checks when they were fetched (or at their first use since the
                # worker started): failing to load now, they changed on this worker's disk. Dropped, so
                # the next request fetches them afresh instead of failing the same way until removed by
                # hand, and the caller is told to retry (its adapter is not at fault) - unless a copy
                # fetched or built again after such a drop failed too: then it is the adapter (a file the
                # validator passes and the reader refuses), refused as such, not retried for ever.
                again = any(key in self._dropped_after_failed_load for key in held_keys)
                self._discard_local(held_keys)
                if again:
                    raise
                for key in held_keys:
                    self._dropped_after_failed_load[key] = None
                while len(self._dropped_after_failed_load) > MAX_DROPPED_AFTER_FAILED_LOAD:
                    self._dropped_after_failed_load.popitem(last=False)
                raise LocalCopyFailed(error) from error
            finally:
                self._release(held_keys)
        finally:
            ended.set()
            self._in_flight.discard(claim)
            key_calls.discard(call)
            if not key_calls and self._key_streams.get(auth.api_key_id) is key_calls:
                del self._key_streams[auth.api_key_id]
            if reservation is not None and not reservation.done():
                # Ended before the answer (refused by the engine, failed, cancelled): nothing was delivered,
                # so a reservation it makes is given back as it arrives. The call keeps its place in the
                # tenant's stream share until then (and until that release answered): control-plane work
                # it left running counts as its own, else a loop of calls cancelled at once queued
                # reservations without bound, ahead of every other tenant's (seconds of first-token delay,
                # and theirs timing out unreserved).
                reservation.add_done_callback(
                    lambda task: (
                        self._release_request_id(
                            auth.tenant_id, request_id, then=lambda: self._leave(auth.tenant_id)
                        )
                        if _reserved(task)
                        else self._leave(auth.tenant_id)
                    )
                )
            elif _reserved(reservation) and not self._usage.has_pending(auth.tenant_id, request_id):
                # Nothing of this stream is waiting to be billed: either nothing was delivered (a retry
                # under this id must be served) or its usage already reached the control plane (which
                # refuses the id on its own). Given back beside the call; the expiry covers a failure.
                self._release_request_id(auth.tenant_id, request_id, then=lambda: self._leave(auth.tenant_id))
            else:
                self._leave(auth.tenant_id)

    async def _prepare(
        self, valid: ValidRequest, by_name, tenant_id: str
    ) -> tuple[list[int], tuple[AdapterRef, ...], str, float]:
        """(prompt token ids, the engine's adapter refs held on disk, their slowest tier, ms the call
        waited for them: a fetch from the control plane, or a merge's build)."""
        prompt_ids = await self._prompt_ids(valid)
        check_prompt_length(len(prompt_ids), self.limits, valid)
        for adapter in by_name.values():
            self._follow_keep_warm(adapter)
        fetch_started = time.monotonic()
        adapter_refs, tier, build_ms = await self._resolve(valid, by_name, tenant_id)
        # What the call waited for before the engine: a fetch from the control plane (with a merge built
        # from it), else a merge's build (0 when nothing was built); it counts as adapter load.
        fetch_ms = (time.monotonic() - fetch_started) * 1000 if tier == "remote" else build_ms
        return prompt_ids, adapter_refs, tier, fetch_ms

    def drop_keep_warm(self, adapter_id: str) -> None:
        """The registry changed what `adapter_id` is (deleted, replaced, new terms): the key it asked to keep
        warm no longer is on its account; its next call asks again if the wish still stands."""
        held = self._keep_warm_keys.pop(adapter_id, None)
        if held is not None:
            self._engine.set_keep_warm(held, adapter_id, False)

    def _follow_keep_warm(self, adapter: ResolvedAdapter) -> None:
        """Tells the engine what `adapter`'s registry row says of keep-warm now, when that changed."""
        wanted = adapter.cache_key if adapter.keep_warm and adapter.sha256 else None
        held = self._keep_warm_keys.get(adapter.adapter_id)
        if wanted == held:
            return
        if held is not None:
            self._engine.set_keep_warm(held, adapter.adapter_id, False)
            del self._keep_warm_keys[adapter.adapter_id]
        if wanted is not None:
            self._engine.set_keep_warm(wanted, adapter.adapter_id, True)
            self._keep_warm_keys[adapter.adapter_id] = wanted

    async def _run(
        self,
        valid,
        request_id,
        auth,
        prompt_ids,
        adapter_refs,
        by_name,
        tier,
        fetch_ms,
        arrival,
        whole,
        gate: asyncio.Future | None,
        call: _KeyCall,
        held: _Reservation,
    ) -> AsyncIterator[Chunk]:
        """The engine part of `generate`: outputs to chunks, delivered counts, the usage record. The first
        chunk waits for `gate` (the key's fresh answer and the request id's reservation, raising a refusal)
        when it has not answered yet."""
        engine_request = EngineRequest(
            # The engine's id is private: two calls may carry the same client request id.
            request_id=uuid.uuid4().hex,
            prompt_token_ids=prompt_ids,
            sampling=SamplingOptions(
                temperature=valid.temperature,
                top_p=valid.top_p,
                top_k=valid.top_k,
                # Past the context the engine stops with "length" anyway (the limit is the server's).
                max_tokens=min(valid.max_tokens, self.limits.max_model_len),
                seed=valid.seed,
                stop=valid.stop,
                repetition_penalty=valid.repetition_penalty,
                logprobs=valid.logprobs,
            ),
            adapters=() if valid.is_ensemble else adapter_refs,
            arrival_time=arrival,
            ensemble=ensemble_of(valid, adapter_refs),
            tenant=auth.tenant_id,
            adapters_field="mix" if valid.from_mix else "adapter",
        )
        mix_name = next((a.name for a in auth.adapters if a.mix is not None), "")
        progress = _Progress(
            prompt_tokens=len(prompt_ids),
            adapters=billed_adapters(valid, by_name),
            billed_per_token=len(valid.adapters) if valid.is_ensemble else 1,
            request_kind=request_kind(valid.mix_method, len(valid.adapters), saved_mix=bool(mix_name)),
            mix_name=mix_name,
        )
        if call.revoked:  # while it prepared: nothing was delivered
            raise KeyRevoked()
        call.engine_request_id = engine_request.request_id
        outputs = self._engine.generate(engine_request)
        activity = self.activity.add(name for name in valid.adapter_names if name)  # no base member
        # The reporter's timer spools the count delivered so far while the stream runs.
        stream = self._usage.track(
            lambda: (
                None
                if whole
                else self._usage_record(request_id, auth, progress, arrival, CHECKPOINT_FINISH_REASON)
            )
        )
        try:
            async for out in outputs:
                if out.error is not None:
                    raise out.error
                self.activity.mark_running(activity)
                if not out.finished and not out.new_token_ids and not out.new_text:
                    continue  # nothing new to send
                if gate is not None:
                    _raise_if_failed(await _settled(gate))
                    gate = None
                if held.lost is not None or (held.until is not None and time.monotonic() >= held.until):
                    await self._hold_request_id(auth.tenant_id, request_id, held)  # lapsed, or taken
                if progress.completion_tokens and self._usage.unspooled_too_long():
                    # The spool has refused this stream's checkpoints: what it sends now a crash would
                    # leave unbilled. It ends here, billed for what it delivered (kept in memory and sent).
                    raise UsageUnrecordable(self._usage.write_error or OSError("usage spool unwritable"))
                finish = self._finish(out, progress, tier, fetch_ms) if out.finished else None
                # Counted as it is handed to the transport, before the yield: a cancellation that lands
                # while the servicer writes it (the caller may already have it) closes this generator at
                # the yield, and a count after it would never run, leaving a delivered answer unbilled.
                first_chunk = progress.completion_tokens == 0
                self._count_streamed(progress, out, arrival)
                if first_chunk and not whole:  # spooled before it is handed over: a SIGKILL now bills it
                    try:
                        self._usage.checkpoint((stream,))
                    except OSError as error:  # the spool failed (disk full, read-only): never handed over
                        progress.completion_tokens = 0
                        raise UsageUnrecordable(error) from error
                    except BaseException:
                        progress.completion_tokens = 0
                        raise
                yield Chunk(
                    request_id=request_id,
                    text=out.new_text,
                    token_ids=list(out.new_token_ids),
                    logprobs=list(out.new_logprobs or []) if valid.logprobs else [],
                    finish=finish,
                    text_offsets=list(out.new_text_offsets or []) if valid.logprobs else [],
                )
                if out.finished:
                    progress.finish_reason = out.finish_reason or "stop"
                    break
        except (asyncio.CancelledError, GeneratorExit):
            progress.finish_reason = "abort"
            if whole:
                progress.completion_tokens = 0  # the caller received nothing
            raise
        except BaseException:
            progress.finish_reason = "error"
            if whole:
                progress.completion_tokens = 0
            raise
        finally:
            self.activity.remove(activity)
            await _close(outputs)
            try:
                self._record_usage(request_id, auth, progress, arrival)
            finally:  # after the final record: its last checkpoint stays in the spool until then
                self._usage.untrack(stream)

    async def _check_request_id_unused(self, tenant_id: str, request_id: str, held: _Reservation) -> bool:
        """Reserves a client request id for this stream at the control plane (atomic across workers);
        refuses one already billed or served elsewhere now: served again, it would be free. Usage still
        in the spool is unknown to the control plane, so the spool is asked first. Returns whether the
        id was reserved: with the control plane unreachable the call goes on unreserved (counted), kept
        from double billing by the usage key; this worker's in-flight set and the usage it holds (spooled,
        or among its last acknowledged records) stop duplicates then, not an id another worker served."""
        if self._usage.has_recorded(tenant_id, request_id):
            raise RequestIdUsed(request_id)
        sent_at = time.monotonic()
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
        held.until = sent_at + self._reservation_ms / 1000
        return True

    async def _hold_request_id(self, tenant_id: str, request_id: str, held: _Reservation) -> None:
        """Before a chunk is handed over: raises when the stream no longer holds its request id. A renewal
        found it taken, or the reservation lapsed (the worker was paused past it) and reserving it again is
        refused: another worker served it meanwhile, or its usage is recorded. A control plane that cannot
        answer lets the stream go on unreserved, as a call that found it down at its start."""
        if held.lost is not None:
            raise held.lost
        if held.until is None or time.monotonic() < held.until:
            return
        error = await self._reserve_again(tenant_id, request_id, held)
        if error is None:
            return
        if error.code == grpc.StatusCode.ALREADY_EXISTS:
            log.warning("request id reservation lapsed and was taken while its stream ran: %s", error.message)
            held.lost = error
            raise error
        log.warning("request id reservation lapsed; the stream goes on unreserved: %s", error.message)

    async def _reserve_again(
        self, tenant_id: str, request_id: str, held: _Reservation
    ) -> ControlPlaneError | None:
        """Reserves the stream's id again (a renewal), recording in `held` until when it holds it (None: not
        reserved, when the control plane refused or could not answer); returns the refusal, if any."""
        sent_at = time.monotonic()
        try:
            await self._cp.reserve_request_id(
                tenant_id, request_id, self._state.worker_id, self._reservation_ms, renewal=True
            )
        except ControlPlaneError as error:
            held.until = None
            return error
        held.until = sent_at + self._reservation_ms / 1000
        return None

    async def _renew_reservation(
        self,
        tenant_id: str,
        request_id: str,
        reservation: asyncio.Future,
        ended: asyncio.Event,
        held: _Reservation,
    ) -> None:
        """Once `reservation` reserved the id, reserves it again (this worker's own: a renewal) every third
        of its time to live while the stream runs and, once `ended`, while its usage waits in the spool
        (until the control plane records it, only the reservation keeps another worker from serving the
        id). A renewal that fails is tried again at the next one; a refusal (its usage was recorded
        meanwhile, or another worker took the id) ends it."""
        try:
            if not await asyncio.shield(reservation):
                return
        except Exception:
            return  # refused or failed: the stream ends on it, nothing to renew
        while True:
            await asyncio.sleep(self._reservation_ms / 3000)
            if ended.is_set() and not self._usage.has_pending(tenant_id, request_id):
                return  # delivered nothing (released), or its usage reached the control plane
            error = await self._reserve_again(tenant_id, request_id, held)
            if error is None:
                continue
            if error.code == grpc.StatusCode.ALREADY_EXISTS:
                if not ended.is_set():
                    log.warning("request id reservation lost while its stream runs: %s", error.message)
                    held.lost = error  # its next chunk ends it
                return
            # The control plane is away: the stream goes on unreserved meanwhile.
            log.warning("request id reservation not renewed (tried again later): %s", error.message)

    def _leave(self, tenant_id: str) -> None:
        """One of the tenant's streams, and the control-plane work it started, ended."""
        self._tenant_streams[tenant_id] -= 1
        if self._tenant_streams[tenant_id] <= 0:
            del self._tenant_streams[tenant_id]

    def _release_request_id(
        self, tenant_id: str, request_id: str, then: Callable[[], None] | None = None
    ) -> None:
        """Gives the reservation back beside the call; `then` runs once the control plane answered."""

        async def release() -> None:
            try:
                await self._cp.release_request_id(tenant_id, request_id, self._state.worker_id)
            except ControlPlaneError as error:
                log.warning("request id reservation not released (it expires): %s", error.message)
            finally:
                if then is not None:
                    then()

        task = asyncio.get_running_loop().create_task(release())
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _prompt_ids(self, valid: ValidRequest) -> list[int]:
        if valid.prompt_token_ids is not None:
            return list(valid.prompt_token_ids)
        tokenizer = self._engine.tokenizer
        if tokenizer is None:
            raise RequestFieldError(
                "prompt",
                "cannot be text: this model has no tokenizer; send token ids (gRPC: prompt_token_ids; "
                "HTTP: the prompt as a list of integers)",
            )
        limit = self.limits.max_model_len - 1  # a prompt leaves room for one generated token
        try:
            return await asyncio.to_thread(
                tokenizer.encode_within, valid.prompt, limit, valid.add_special_tokens
            )
        except PromptTooLong as e:
            count = f"more than {limit} tokens" if e.count is None else f"{e.count} tokens"
            raise RequestFieldError("prompt", f"is too long: {count}, the limit is {limit}") from None

    async def _resolve(
        self, valid: ValidRequest, by_name, tenant_id: str
    ) -> tuple[tuple[AdapterRef, ...], str, float]:
        """(the engine's adapter refs, the slowest tier they came from, ms spent building a merge)."""
        if valid.is_merge:
            return await self._resolve_merge(valid, by_name, tenant_id)
        # An ensemble's base member ("") needs no adapter; its members run each at weight 1 in its slot.
        resolved = [(by_name[name], weight) for name, weight in valid.adapters if name]
        if not resolved:
            self._metrics.cache_lookups.labels("none").inc()
            return (), "none", 0.0
        results = await asyncio.gather(
            *(self._artifacts.ensure(a.cache_key, hold=True) for a, _ in resolved), return_exceptions=True
        )
        failed = [(i, r) for i, r in enumerate(results) if isinstance(r, BaseException)]
        if failed:  # each ensure that failed gave back its own hold; give back the others'
            self._artifacts.release(r.key for r in results if not isinstance(r, BaseException))
            position, error = failed[0]
            if isinstance(error, ArtifactRejected):
                name = [name for name, _ in valid.adapters if name][position]  # the base member has none
                raise _rejected_as_named(error, valid, name) from None
            raise error
        locals_ = results
        refs = tuple(
            AdapterRef(key=a.cache_key, path=local.path, weight=1.0 if valid.is_ensemble else weight)
            for (a, weight), local in zip(resolved, locals_, strict=True)
        )
        tier = "remote" if any(local.tier == "remote" for local in locals_) else "disk"
        return refs, tier, 0.0

    async def _resolve_merge(
        self, valid: ValidRequest, by_name, tenant_id: str
    ) -> tuple[tuple[AdapterRef, ...], str, float]:
        """A TIES / DARE / magnitude-prune mix: its derived adapter, which the engine serves as one adapter
        keyed by the spec. Built once per canonical spec, in a thread, from the sources fetched (held
        only while it builds); a merge already on disk needs no source at all. A new build takes a place
        in `tenant_id`'s share of the build queue."""
        merges = self.merge_store()
        members = [by_name[name] for name, _ in valid.adapters]
        first_of: dict[str, int] = {}
        for i, adapter in enumerate(members):
            if (first := first_of.setdefault(adapter.sha256, i)) != i:
                raise RequestFieldError(
                    f"mix[{i}].adapter",
                    f"has the same content as mix[{first}].adapter (one adapter under two names)",
                )
        # Sources by cache key: a merge of private content is its owner's alone, on disk and in slots.
        sources = [(a.cache_key, weight) for a, (_, weight) in zip(members, valid.adapters, strict=True)]
        spec = MergeSpec.of(
            sources,
            valid.mix_method,
            valid.density,
            valid.majority_sign_method,
            scope=cache_scope(tenant_id, private=True),  # this tenant's merge: no other sees it cached
        )
        found = merges.lookup(spec, hold=True)
        if found is not None:
            return (AdapterRef(key=found.key, path=found.path),), "disk", 0.0
        keys = [key for key, _ in sources]
        results = await asyncio.gather(
            *(self._artifacts.ensure(key, hold=True) for key in keys), return_exceptions=True
        )
        failed = [(i, r) for i, r in enumerate(results) if isinstance(r, BaseException)]
        if failed:  # each ensure that failed gave back its own hold; give back the others'
            self._artifacts.release(r.key for r in results if not isinstance(r, BaseException))
            position, error = failed[0]
            if isinstance(error, ArtifactRejected):
                raise _rejected_as_named(error, valid, valid.adapters[position][0]) from None
            raise error
        try:
            paths = {r.key: r.path for r in results}
            built = await merges.build(spec.with_paths(paths), hold=True, tenant_id=tenant_id)
        except MergeBuildError as error:
            if error.source_key not in keys:
                raise
            raise error.renamed(keys.index(error.source_key)) from None  # its place in the request
        finally:
            self._artifacts.release(keys)
        tier = "remote" if any(r.tier == "remote" for r in results) else "disk"
        return (AdapterRef(key=built.key, path=built.path),), tier, built.wait_ms

    def merge_store(self) -> MergeStore:
        """This worker's merges, beside its artifacts (`<state>/merges`), sized to its engine's slots; the
        directory's budget is the disk tier's default (a quarter of the free space, at most 20 GiB)."""
        if self._merges is None:
            self._merges = MergeStore(
                self._artifacts.root.parent / "merges",
                self._engine.spec,
                self._engine.max_lora_rank,
                on_built=self._observe_merge,
                max_disk_bytes=default_disk_cache_bytes(self._artifacts.root),
                on_damaged=self._engine.invalidate,  # what the engine read from damaged files
                max_pending_builds_per_tenant=self._max_pending_merges_per_tenant,
            )
        return self._merges

    def drop_merges_of(self, sha256: str) -> list[str]:
        """A source adapter was deleted or replaced upstream: the merges built from it leave the disk tier
        (once their streams end) and the engine's tiers; returns their keys."""
        if self._merges is None:
            return []
        keys = self._merges.drop_source(sha256)
        for key in keys:
            self._engine.invalidate(key)
        return keys

    def drop_merges_of_key(self, source_key: str) -> list[str]:
        """`drop_merges_of` for the merges built from one cache key of a content (its other keys, other
        tenants' copies or its public one, still serve it)."""
        if self._merges is None:
            return []
        keys = self._merges.drop_source_key(source_key)
        for key in keys:
            self._engine.invalidate(key)
        return keys

    def _observe_merge(self, _spec, _key, report) -> None:
        self._metrics.merge_build_s.observe(report.build_ms / 1000)
        self._metrics.merge_truncation_error.observe(report.relative_error)

    def _discard_local(self, keys: list[str]) -> None:
        """Forgets this worker's disk copies of these artifacts, and has its merges among them checked
        against their digests before their next use (built again from their sources when they fail)."""
        for key in keys:
            if self._merges is not None and self._merges.is_held(key):
                log.warning(
                    "merge %s failed to load from this worker's disk: checked before its next use", key[:12]
                )
                self._merges.suspect(key)
            else:
                log.warning(
                    "artifact %s failed to load from this worker's disk: fetched again next time", key[:12]
                )
                self._artifacts.discard(key)

    def _release(self, keys: list[str]) -> None:
        """Ends the stream's holds: merges on the merge store, artifacts on the artifact store."""
        merges = [key for key in keys if self._merges is not None and self._merges.is_held(key)]
        self._artifacts.release(key for key in keys if key not in merges)
        if merges:
            self._merges.release(merges)

    def _finish(self, out, progress: _Progress, tier: str, fetch_ms: float) -> Finish:
        """The last chunk's finish reason, usage and timing; notes the timing for billing."""
        # A fetch from the control plane is the slowest tier; otherwise the engine knows.
        final_tier = "remote" if tier == "remote" else out.cache_tier or "none"
        finish = Finish(
            reason=out.finish_reason or "abort",
            prompt_tokens=out.prompt_tokens,
            completion_tokens=progress.completion_tokens + len(out.new_token_ids),
            queue_ms=out.queue_ms,
            adapter_load_ms=out.adapter_load_ms + fetch_ms,
            ttft_ms=out.ttft_ms,
            total_ms=out.total_ms,
            cache_tier=final_tier,
        )
        progress.queue_ms, progress.ttft_ms, progress.total_ms = out.queue_ms, out.ttft_ms, out.total_ms
        self._observe_adapter(final_tier, finish.adapter_load_ms)
        return finish

    def _count_streamed(self, progress: _Progress, out, arrival: float) -> None:
        """Counts one message handed to the transport: its tokens as delivered, and one latency sample. A
        message may hold several tokens (a consumer that lagged gets them merged), so `inter_token_s`
        is observed once per message, with the message's gap divided by its tokens: a sample per message
        (not per token) of the mean time between tokens."""
        n = len(out.new_token_ids)
        if not n:
            return
        now = time.monotonic()
        if progress.completion_tokens == 0:
            self._metrics.ttft_s.observe(now - arrival)
        elif progress.last_token_at is not None:
            self._metrics.inter_token_s.observe((now - progress.last_token_at) / n)
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
        if record is None:
            return
        try:
            self._usage.record(record)
        except OSError as error:
            # The stream is over: what it delivered is its answer, and its status is not the spool's (a
            # retryable UNAVAILABLE after a whole answer made clients run and pay for it twice). The record
            # is pending in memory and goes to the control plane with the next flush; only its durability
            # against a crash before then is lost. The spool's health check turns new calls away meanwhile.
            log.error(
                "usage of request %s is kept in memory only: the spool cannot be written: %s",
                request_id,
                error,
            )

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
            prompt_tokens=progress.prompt_tokens * progress.billed_per_token,
            completion_tokens=progress.completion_tokens * progress.billed_per_token,
            queue_ms=progress.queue_ms,
            ttft_ms=progress.ttft_ms,
            total_ms=progress.total_ms or (time.monotonic() - arrival) * 1000,
            finished_at=time.time(),
            finish_reason=finish_reason,
            request_kind=progress.request_kind,
            mix_name=progress.mix_name,
        )


class AuthorizationChanged(Exception):
    """The fresh answer for a call started on a recent one differs from it: the call starts over."""


def _rejected_as_named(error: ArtifactRejected, valid: ValidRequest, name: str) -> ArtifactRejected:
    """This worker's refusal of adapter `name`, named by the request field that named it: `adapter`, or
    the adapter's place in the mix (an ensemble's base member counts: the refusal of `mix[1]` after a base
    `mix[0]` named `mix[0]`; and a request naming one adapter heard of a `mix[0]` it never sent)."""
    if not valid.from_mix and len(valid.adapters) == 1:
        return ArtifactRejected(f"adapter.{error.field}", error.reason)
    return ArtifactRejected(f"mix[{valid.adapter_names.index(name)}].{error.field}", error.reason)


def _in_order(*checks: asyncio.Future | None) -> asyncio.Future | None:
    """One future for several checks (None ones left out): it raises the first failure in the given order
    (each check's own task runs on regardless), else finishes with the last check's result."""
    pending = [c for c in checks if c is not None]
    if len(pending) <= 1:
        return pending[0] if pending else None

    async def all_of():
        result = None
        for check in pending:
            result = await asyncio.shield(check)
        return result

    gate = asyncio.ensure_future(all_of())
    gate.add_done_callback(_consume_error)
    return gate


def _consume_error(task: asyncio.Future) -> None:
    """Marks a background task's error as seen (it is raised where the task is awaited, if it is)."""
    if not task.cancelled():
        task.exception()


async def _settled(task: asyncio.Future | None) -> asyncio.Future | None:
    """`task` once done, without raising its error (None stays None)."""
    if task is not None and not task.done():
        await asyncio.wait([task])
    return task


def _raise_if_failed(task: asyncio.Future | None) -> None:
    if task is not None and not task.cancelled() and task.exception() is not None:
        raise task.exception()


def _reserved(task: asyncio.Future | None) -> bool:
    """Whether the request id reservation `task` reserved the id (its error, if any, is consumed)."""
    if task is None or not task.done() or task.cancelled():
        return False
    return task.exception() is None and bool(task.result())


async def _close(outputs) -> None:
    aclose = getattr(outputs, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:  # closing must never hide the call's own outcome
            log.exception("closing the engine stream failed")
