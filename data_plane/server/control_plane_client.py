"""The worker's side of WorkerService: register, heartbeat, authorise callers (cached), fetch
artifacts, report usage.

Control-plane answers a caller can cause (UNAUTHENTICATED, PERMISSION_DENIED, NOT_FOUND,
INVALID_ARGUMENT, FAILED_PRECONDITION) pass through as `ControlPlaneError` with the same code; anything
else (unreachable, timeout, a server fault) becomes UNAVAILABLE, so the caller may retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

import grpc
from cachetools import TTLCache
from google.protobuf.timestamp_pb2 import Timestamp

from data_plane.server.usage_reporter import UsageRecord
from openlora.base_model import BaseModelSpec
from openlora.cache_scope import cache_key
from openlora.grpc_reconnect import reconnect_options
from openlora.v1 import admin_pb2, worker_pb2, worker_pb2_grpc
from openlora.wire import spec_to_proto

log = logging.getLogger(__name__)

# Entries per ListModels call (the control plane's largest page).
LIST_MODELS_PAGE_SIZE = 1000
# Reservations per ReserveRequestIds call (the control plane takes up to 256), and such calls at a time.
MAX_RESERVATIONS_PER_CALL = 128
MAX_RESERVATION_CALLS_IN_FLIGHT = 4
# After a control plane answered UNIMPLEMENTED to ReserveRequestIds: one id per call for this long.
BATCHES_RETRY_S = 60.0

_PASS_THROUGH = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.DATA_LOSS,  # the control plane's stored copy of an artifact is damaged: no retry helps
}
AUTHORIZE_TIMEOUT_S = 5.0
# Authorize calls one api key has at the control plane at once; its others wait (at most
# AUTHORIZE_TIMEOUT_S, then RESOURCE_EXHAUSTED). Calls naming adapters nobody resolved are never cached:
# one key's hundreds of them in flight delayed every other tenant's first tokens by seconds.
MAX_AUTHORIZE_IN_FLIGHT_PER_KEY = 8
# Authorize calls at the control plane at once, all keys together, for keys with no recent answer: a flood
# of random keys (each its own key, so the per-key bound does not apply) kept one Authorize per request at
# the control plane, a database query each, and delayed the answers of every real tenant's expiring keys.
# Keys answered recently never wait for this bound; a new tenant's first call waits at most for the
# flood's turn, then RESOURCE_EXHAUSTED like the per-key bound.
MAX_UNKNOWN_KEY_AUTHORIZE_IN_FLIGHT = 16
# A key the control plane refused (UNAUTHENTICATED: unknown or revoked) is refused again at the worker for
# this long without asking: keys are random secrets the control plane makes, so one refused never becomes
# valid, and a client repeating a bad key cost an Authorize per call.
REFUSED_KEY_TTL_S = 10.0
CALL_TIMEOUT_S = 10.0
# An artifact fetch may take this long in all (a large artifact on a slow link)...
FETCH_TIMEOUT_S = 300.0
# ...but gives up (UNAVAILABLE) once no chunk came for this long: a control plane frozen mid-fetch (a stopped
# process, a hung disk) held the first calls of that adapter for the whole FETCH_TIMEOUT_S. The first chunk
# waits for the control plane's digest check of its stored copy (seconds for the largest adapter).
FETCH_STALL_S = 30.0
DEFAULT_AUTH_CACHE_MAX_ENTRIES = 10_000
# One tenant's answers take at most this share of the entries (its oldest go first past it): one tenant
# calling thousands of distinct name lists pushed every other tenant's answers out, and with them their
# service through a control-plane outage.
AUTH_CACHE_TENANT_SHARE = 1 / 16
# An answer no longer fresh is kept this long (within the entry bound) as a recent one: a call it covers
# starts its work while Authorize asks again, and delivers nothing before the fresh answer. An adapter
# called about once an hour is past any fresh TTL on every call; a day covers daily jobs too.
AUTH_RECENT_S = 24 * 3600.0
# While the control plane cannot be reached (UNAVAILABLE, DEADLINE_EXCEEDED), an answer that expired at
# most this long ago still serves its key: callers keep being served through a control plane restart or
# a database outage, instead of failing 5 s into it. Revocations and deletions reach the worker as hints
# and drop the answer at once, outage or not.
AUTH_OUTAGE_GRACE_S = 600.0
_OUTAGE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
HEARTBEAT_BACKOFF_MAX_S = 30.0
# A stopping worker waits this long for the control plane to take its leave (a control plane that is down
# must not hold the stop; the worker then stops counting as live by the heartbeat rule).
DEREGISTER_TIMEOUT_S = 3.0


class IdentityTaken(Exception):
    """Heartbeats refused, and registering again refused because another live process holds the worker id
    (ALREADY_EXISTS): this one must stop serving under it."""


class ControlPlaneError(Exception):
    """The control plane's answer `code`; `field`, when the worker knows it, is the request field the
    refusal is about (`mix[1].adapter`), for an answer that names fields (the HTTP API's `param`)."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field

    @classmethod
    def from_rpc(cls, error: grpc.RpcError, what: str) -> ControlPlaneError:
        code = error.code()
        if code in _PASS_THROUGH:
            return cls(code, error.details() or code.name.lower())
        if code == grpc.StatusCode.UNIMPLEMENTED:  # said as it is; a caller still sees UNAVAILABLE
            return cls(
                grpc.StatusCode.UNAVAILABLE, f"the control plane does not implement {what} (an older version)"
            )
        return cls(
            grpc.StatusCode.UNAVAILABLE, f"control plane unavailable ({what}: {code.name}); retry shortly"
        )


@dataclass(frozen=True)
class ResolvedAdapter:
    name: str
    adapter_id: str
    sha256: str
    size_bytes: int
    rank: int
    # The owner asked that this adapter never leave the worker's host memory once there.
    keep_warm: bool = False
    # Set when the name is a saved mix of the caller's tenant (then adapter_id is the mix's id).
    mix: ResolvedMix | None = None
    # '' for public content; a private adapter's owner scope (openlora/cache_scope.py).
    cache_scope: str = ""

    @property
    def cache_key(self) -> str:
        """The key of this adapter's content in every cache tier of the worker (see cache_scope)."""
        return cache_key(self.sha256, self.cache_scope)

    def adapter_ids(self) -> set[str]:
        """Its own id and, for a saved mix, its members' ids."""
        members = self.mix.members if self.mix is not None else ()
        return {self.adapter_id} | {m.adapter_id for m, _ in members if m is not None}

    def sha256s(self) -> set[str]:
        members = self.mix.members if self.mix is not None else ()
        return {self.sha256} - {""} | {m.sha256 for m, _ in members if m is not None}


@dataclass(frozen=True)
class ResolvedMix:
    """A saved mix as Authorize resolved it: the request fields it stands for (inference_pb2 enums)."""

    # (member, weight); None is the base model (an ensemble member).
    members: tuple[tuple[ResolvedAdapter | None, float], ...]
    method: int
    density: float | None
    majority_sign_method: int
    combine: int


@dataclass(frozen=True)
class ListedModel:
    """An adapter or saved mix a key may name on this worker's base model."""

    name: str
    kind: str  # "adapter" or "mix"
    owned_by: str  # the owner's tenant name
    created_unix_s: int


@dataclass(frozen=True)
class Authorization:
    tenant_id: str
    tenant: str
    can_infer: bool
    # Parallel to the adapter names asked for.
    adapters: tuple[ResolvedAdapter, ...]
    # Id of the api key this answer is for: a "revoke" hint names it.
    api_key_id: str = ""


class ControlPlaneClient:
    def __init__(
        self,
        target: str,
        worker_token: str,
        *,
        auth_cache_ttl_s: float = 10.0,
        auth_cache_max_entries: int = DEFAULT_AUTH_CACHE_MAX_ENTRIES,
    ) -> None:
        self._channel = grpc.aio.insecure_channel(target, options=reconnect_options())
        self._stub = worker_pb2_grpc.WorkerServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {worker_token}"),)
        self._auth_cache_ttl_s = auth_cache_ttl_s
        # (api key, adapter names) -> (fresh until, monotonic seconds; answer). Bounded in entries and
        # time: an answer is served while fresh (the answer's own TTL, the control plane's, never longer,
        # checked on every hit), then kept as a recent one for AUTH_RECENT_S (`recent_authorization`).
        self._auth_cache: TTLCache[tuple[str, tuple[str, ...]], tuple[float, Authorization]] = TTLCache(
            maxsize=auth_cache_max_entries, ttl=AUTH_RECENT_S, timer=time.monotonic
        )
        # The cache keys of each api key's answers and, in the order stored, of each tenant's (entries the
        # cache dropped on its own linger here until the tenant's quota or a sweep in `_store` removes
        # them): a forget of one key's answers touches that key's alone instead of scanning the cache
        # (each NOT_FOUND did). By the api key's id too: a revocation names the id, and scanning every
        # answer for it cost the event loop a pass over the cache per revoke hint (a control plane
        # republishes up to a thousand of them when it starts).
        self._keys_of_api_key: dict[str, set[tuple[str, tuple[str, ...]]]] = {}
        self._keys_of_api_key_id: dict[str, set[tuple[str, tuple[str, ...]]]] = {}
        self._api_key_id_of_key: dict[tuple[str, tuple[str, ...]], str] = {}
        self._keys_of_tenant: dict[str, OrderedDict[tuple[str, tuple[str, ...]], None]] = {}
        self._tenant_of_key: dict[tuple[str, tuple[str, ...]], str] = {}
        self._tenant_quota = max(16, int(auth_cache_max_entries * AUTH_CACHE_TENANT_SHARE))
        # Authorize calls in flight by cache key, with the forget count they started under: concurrent
        # callers of one key share one call (a burst of first calls is one round trip, not hundreds).
        self._asking: dict[tuple[str, tuple[str, ...]], tuple[int, asyncio.Future]] = {}
        # Bumped by every forget: an answer whose call started before a forget is not cached (it may
        # predate the revocation or deletion the forget was for), and later callers do not join that call.
        # Forgets of one key's answers (its NOT_FOUND names, its refusal) count for that key alone: one
        # tenant's stream of 404s, or a stranger's of 401s, kept every other caller's answers uncached.
        self._forgets = 0
        # Kept only for keys with an Authorize call in flight (no eviction that could reset a count
        # while a call waits on it; a flood of strangers' keys leaves nothing behind).
        self._key_forgets: dict[str, int] = {}
        self._asking_per_key: Counter[str] = Counter()
        # Per api key with Authorize calls waiting or running: its gate and how many use it.
        self._key_gates: dict[str, tuple[asyncio.Semaphore, list[int]]] = {}
        # Bounds the Authorize calls of keys with no recent answer (MAX_UNKNOWN_KEY_AUTHORIZE_IN_FLIGHT).
        self._unknown_key_gate = asyncio.Semaphore(MAX_UNKNOWN_KEY_AUTHORIZE_IN_FLIGHT)
        # Keys the control plane refused, with its refusal: refused again at once (REFUSED_KEY_TTL_S).
        self._refused_keys: TTLCache[str, ControlPlaneError] = TTLCache(
            maxsize=auth_cache_max_entries, ttl=REFUSED_KEY_TTL_S, timer=time.monotonic
        )
        # Keys with an answer cached recently (for any names), each with its tenant's id: `knows_key`.
        self._answered_keys: TTLCache[str, str] = TTLCache(
            maxsize=auth_cache_max_entries, ttl=AUTH_RECENT_S, timer=time.monotonic
        )
        # When the last Authorize got no answer (unreachable, or past its deadline): cached answers within
        # the outage grace then serve at once instead of each call waiting out the timeout again.
        self._unreachable_since: float | None = None
        # Calls served on an expired answer while the control plane was away (AUTH_OUTAGE_GRACE_S).
        self.outage_answers = 0
        # False after a control plane answered UNIMPLEMENTED to ReserveRequestId (an older one).
        self._can_reserve = True
        # Reservations waiting for the next ReserveRequestIds call; the task that sends them, the calls
        # under way and their bound; until when (event-loop time) a control plane that answered
        # UNIMPLEMENTED to it is asked one id per call instead.
        self._reservations_waiting: deque[_WaitingReservation] = deque()
        self._reserving: asyncio.Task | None = None
        self._reservation_tasks: set[asyncio.Task] = set()
        self._reservation_calls = asyncio.Semaphore(MAX_RESERVATION_CALLS_IN_FLIGHT)
        self._batches_unsupported_until = float("-inf")
        # How the base model is held (weight_format, bits per weight, resident bytes): sent with heartbeats.
        self._base_weights: dict[str, object] = {}

    async def close(self) -> None:
        tasks = [t for t in (self._reserving, *self._reservation_tasks) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        _fail_all(list(self._reservations_waiting), _unavailable("ReserveRequestIds: the worker is closing"))
        self._reservations_waiting.clear()
        await self._channel.close()

    async def register(
        self,
        worker_id: str,
        address: str,
        spec: BaseModelSpec,
        max_lora_rank: int,
        num_adapter_slots: int,
        instance_id: str = "",
        previous_instance_id: str = "",
    ) -> tuple[str, float]:
        """Registers this worker as `instance_id` (this process run; `previous_instance_id`: the run its
        state dir registered last); returns (worker id, heartbeat interval in seconds)."""
        request = worker_pb2.RegisterWorkerRequest(
            worker_id=worker_id,
            address=address,
            base_model=spec_to_proto(spec),
            max_lora_rank=max_lora_rank,
            num_adapter_slots=num_adapter_slots,
            instance_id=instance_id,
            previous_instance_id=previous_instance_id,
        )
        try:
            response = await self._stub.RegisterWorker(
                request, metadata=self._metadata, timeout=CALL_TIMEOUT_S
            )
        except grpc.RpcError as error:
            raise ControlPlaneError.from_rpc(error, "RegisterWorker") from None
        return response.worker_id, (response.heartbeat_interval_ms or 5000) / 1000

    def set_base_weights(self, weight_format: str, bits_per_weight: float, resident_bytes: int) -> None:
        """How the base model is held, sent with every heartbeat from now on."""
        self._base_weights = {
            "weight_format": weight_format,
            "weight_bits_per_weight": bits_per_weight,
            "resident_weight_bytes": resident_bytes,
        }

    async def heartbeat(
        self, worker_id: str, running: int, waiting: int, resident_sha256: list[str], instance_id: str = ""
    ) -> None:
        """FAILED_PRECONDITION when `instance_id` no longer holds the id (another process registered it)."""
        request = worker_pb2.HeartbeatRequest(
            worker_id=worker_id,
            instance_id=instance_id,
            running_requests=running,
            waiting_requests=waiting,
            resident_adapter_sha256=resident_sha256,
            **self._base_weights,
        )
        try:
            await self._stub.Heartbeat(request, metadata=self._metadata, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as error:
            raise ControlPlaneError.from_rpc(error, "Heartbeat") from None

    async def deregister(self, worker_id: str, instance_id: str) -> None:
        """Tells the control plane this instance leaves (a clean stop, drained): it stops counting as live
        at once. Waits at most DEREGISTER_TIMEOUT_S."""
        request = worker_pb2.DeregisterWorkerRequest(worker_id=worker_id, instance_id=instance_id)
        try:
            await self._stub.DeregisterWorker(request, metadata=self._metadata, timeout=DEREGISTER_TIMEOUT_S)
        except grpc.RpcError as error:
            raise ControlPlaneError.from_rpc(error, "DeregisterWorker") from None

    async def run_heartbeats(
        self,
        worker_id: str,
        interval_s: float,
        stats: Callable[[], tuple[int, int, list[str]]],
        reregister: Callable[[], object],
        on_error: Callable[[], None] | None = None,
        instance_id: str = "",
        on_superseded: Callable[[str], None] | None = None,
    ) -> None:
        """Heartbeats forever as `instance_id`; a control plane that forgot the worker (NOT_FOUND), or
        whose row of it names another instance or says it left (FAILED_PRECONDITION), gets it registered
        again: registration decides whether another process holds the id now. The row may name another
        run without any other process serving (a database restored to an older snapshot names this state
        dir's previous run), and this worker then serves on. Only when registering again is refused because
        another instance is live (ALREADY_EXISTS) is `on_superseded` told, with both messages, and the beats
        end for good (the worker must stop serving under the id; its stop cancels this). Any other failure
        of one beat is logged and the loop goes on: an unreachable control plane is retried at the next
        beat; any other exception (`stats()` reading engine state, say) is counted by `on_error` and waits
        longer after each failure in a row (up to HEARTBEAT_BACKOFF_MAX_S)."""
        failures = 0
        while True:
            await asyncio.sleep(min(interval_s * (2**failures), max(interval_s, HEARTBEAT_BACKOFF_MAX_S)))
            try:
                await self._beat(worker_id, instance_id, stats, reregister)
                failures = 0
            except asyncio.CancelledError:
                raise
            except IdentityTaken as taken:
                if on_superseded is not None:
                    on_superseded(str(taken))
                    break
                log.warning("heartbeat failed: %s", taken)
            except ControlPlaneError as error:  # the next beat at the usual interval is the retry
                log.warning("heartbeat failed: %s", error.message)
                failures = 0
            except Exception:
                log.exception("heartbeat failed; going on")
                failures = min(failures + 1, 8)
                if on_error is not None:
                    on_error()
        # No beat again under an id this instance lost; the worker's stop cancels this wait (returning would
        # have `keep_running` start the beats again).
        await asyncio.Event().wait()

    async def _beat(
        self,
        worker_id: str,
        instance_id: str,
        stats: Callable[[], tuple[int, int, list[str]]],
        reregister: Callable[[], object],
    ) -> None:
        running, waiting, resident = stats()
        try:
            await self.heartbeat(worker_id, running, waiting, resident, instance_id)
        except ControlPlaneError as error:
            if error.code not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
                raise
            log.warning("heartbeat refused: %s; registering again", error.message)
            try:
                await reregister()
            except ControlPlaneError as refusal:
                if refusal.code == grpc.StatusCode.ALREADY_EXISTS:
                    raise IdentityTaken(f"{error.message}; registering again: {refusal.message}") from None
                raise

    def recent_authorization(self, api_key: str, adapter_names: tuple[str, ...]) -> Authorization | None:
        """The last answer for this key and these names when it is no longer fresh but recent (None when
        there is none, or it is still fresh: `authorize` serves that one). Never enough to serve a call:
        it only lets the call's work start while `authorize` asks again. Every forget drops it too."""
        cached = self._auth_cache.get((api_key, adapter_names))
        if cached is None or cached[0] > time.monotonic():
            return None
        return cached[1]

    async def authorize(self, api_key: str, adapter_names: tuple[str, ...], base_model: str) -> Authorization:
        """The caller's tenant, scopes and resolved adapters; served from a cache for at most the TTL.
        Concurrent callers of the same key and names share one Authorize call."""
        key = (api_key, adapter_names)
        cached = self._auth_cache.get(key)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        refused = self._refused_keys.get(api_key)
        if refused is not None:
            raise ControlPlaneError(refused.code, refused.message, refused.field)
        asking = self._asking.get(key)
        stamp = self._stamp(api_key)
        if asking is None or asking[0] != stamp:
            call = asyncio.ensure_future(self._ask(key, base_model, stamp))
            asking = (stamp, call)
            self._asking_per_key[api_key] += 1
            self._asking[key] = asking
            call.add_done_callback(lambda _call, key=key, asking=asking: self._done_asking(key, asking))
        if self._unreachable_since is not None:
            # The control plane did not answer the last Authorize: the key's last answer serves at once
            # while the call above asks again in the background (each call waited out the timeout before).
            last = self._last_answer(key)
            if last is not None:
                self.outage_answers += 1
                return last
        # Shielded: one caller going away does not cancel the answer the others wait for.
        return await asyncio.shield(asking[1])

    @contextlib.asynccontextmanager
    async def _key_gate(self, api_key: str):
        """At most MAX_AUTHORIZE_IN_FLIGHT_PER_KEY Authorize calls of one key at the control plane; a call
        that waits AUTHORIZE_TIMEOUT_S for its turn is RESOURCE_EXHAUSTED."""
        gate, users = self._key_gates.setdefault(
            api_key, (asyncio.Semaphore(MAX_AUTHORIZE_IN_FLIGHT_PER_KEY), [0])
        )
        users[0] += 1
        try:
            try:
                await asyncio.wait_for(gate.acquire(), AUTHORIZE_TIMEOUT_S)
            except TimeoutError:
                raise ControlPlaneError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"this api key has {MAX_AUTHORIZE_IN_FLIGHT_PER_KEY} authorizations in flight and more "
                    "waiting; retry shortly",
                ) from None
            try:
                yield
            finally:
                gate.release()
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._key_gates[api_key]

    @contextlib.asynccontextmanager
    async def _unknown_key_turn(self, api_key: str):
        """A turn among the Authorize calls of keys with no recent answer (MAX_UNKNOWN_KEY_AUTHORIZE_IN_FLIGHT
        at once); a key answered recently goes straight through."""
        if self.knows_key(api_key):
            yield
            return
        try:
            await asyncio.wait_for(self._unknown_key_gate.acquire(), AUTHORIZE_TIMEOUT_S)
        except TimeoutError:
            raise ControlPlaneError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{MAX_UNKNOWN_KEY_AUTHORIZE_IN_FLIGHT} authorizations of new api keys are in flight and more "
                "waiting; retry shortly",
            ) from None
        try:
            yield
        finally:
            self._unknown_key_gate.release()

    def _done_asking(self, key, asking) -> None:
        if self._asking.get(key) is asking:
            del self._asking[key]
        api_key = key[0]
        self._asking_per_key[api_key] -= 1
        if self._asking_per_key[api_key] <= 0:  # no call of this key waits on its count any more
            del self._asking_per_key[api_key]
            self._key_forgets.pop(api_key, None)
        call = asking[1]
        if not call.cancelled():
            call.exception()  # seen here when every caller went away; each waiting caller raises it

    def _stamp(self, api_key: str) -> tuple[int, int]:
        """The forgets that concern `api_key`'s answers so far: every key's, and its own."""
        return self._forgets, self._key_forgets.get(api_key, 0)

    async def _ask(
        self, key: tuple[str, tuple[str, ...]], base_model: str, forgets: tuple[int, int]
    ) -> Authorization:
        api_key, adapter_names = key
        asked_at = time.monotonic()
        request = worker_pb2.AuthorizeRequest(
            api_key=api_key, adapters=list(adapter_names), base_model=base_model
        )
        try:
            async with self._key_gate(api_key), self._unknown_key_turn(api_key):
                response = await self._stub.Authorize(
                    request, metadata=self._metadata, timeout=AUTHORIZE_TIMEOUT_S
                )
        except grpc.RpcError as error:
            if error.code() in _OUTAGE_CODES:
                if self._unreachable_since is None:
                    self._unreachable_since = time.monotonic()
            else:
                self._unreachable_since = None  # it answered, with a refusal
            served = self._outage_answer(key, error.code(), forgets)
            if served is not None:
                return served
            self._drop(key)
            refusal = ControlPlaneError.from_rpc(error, "Authorize")
            if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                self._forget_key(api_key)
                self._refused_keys[api_key] = refusal
            raise refusal from None
        if self._unreachable_since is not None:
            log.info("control plane answers Authorize again")
            self._unreachable_since = None
        if len(response.adapters) != len(adapter_names):
            raise ControlPlaneError(grpc.StatusCode.UNAVAILABLE, "control plane answered for other adapters")
        answer = Authorization(
            tenant_id=response.tenant_id,
            tenant=response.tenant,
            can_infer=admin_pb2.SCOPE_INFER in response.scopes or admin_pb2.SCOPE_ADMIN in response.scopes,
            adapters=tuple(_resolved(a) for a in response.adapters),
            api_key_id=response.api_key_id,
        )
        ttl_s = self._auth_cache_ttl_s
        if response.cache_ttl_ms:
            ttl_s = min(ttl_s, response.cache_ttl_ms / 1000)
        if ttl_s <= 0:  # nothing to cache: no older answer stays as a recent one either
            self._drop(key)
        elif forgets == self._stamp(key[0]):  # else a forget came while it was asked: it may predate it
            self._store(key, (asked_at + ttl_s, answer))
            self._answered_keys[key[0]] = answer.tenant_id
        return answer

    def _outage_answer(
        self, key: tuple[str, tuple[str, ...]], code: grpc.StatusCode, forgets: tuple[int, int]
    ) -> Authorization | None:
        """The last answer for `key` when the control plane is away and it expired at most
        AUTH_OUTAGE_GRACE_S ago (and no forget came since the call started); else None."""
        if code not in _OUTAGE_CODES or forgets != self._stamp(key[0]):
            return None
        last = self._last_answer(key)
        if last is None:
            return None
        self.outage_answers += 1
        log.warning("control plane unreachable (Authorize: %s): serving the key's last answer", code.name)
        return last

    def _last_answer(self, key: tuple[str, tuple[str, ...]]) -> Authorization | None:
        """The key's answer for these names that expired at most AUTH_OUTAGE_GRACE_S ago: the one cached
        for exactly these names, else one composed from the key's other answers within that grace (the
        control plane resolves each name on its own: a key that called `count` alone, and the base model,
        may still call both, or the base model alone, while it is away). None when a name was never
        answered for this key."""
        now = time.monotonic()
        cached = self._auth_cache.get(key)
        if cached is not None and now - cached[0] <= AUTH_OUTAGE_GRACE_S:
            return cached[1]
        api_key, names = key
        answers = []  # (fresh until, names, answer), oldest first: a newer resolution of a name wins
        for other in self._keys_of_api_key.get(api_key, ()):
            entry = self._auth_cache.get(other)
            if entry is not None and now - entry[0] <= AUTH_OUTAGE_GRACE_S:
                answers.append((entry[0], other[1], entry[1]))
        answers.sort(key=lambda answer: answer[0])
        resolved: dict[str, ResolvedAdapter] = {}
        for _, other_names, answer in answers:
            resolved.update(zip(other_names, answer.adapters, strict=True))
        if not answers or any(name not in resolved for name in names):
            return None
        return replace(answers[-1][2], adapters=tuple(resolved[name] for name in names))

    async def list_models(self, api_key: str, base_model: str) -> list[ListedModel]:
        """Every adapter and saved mix the key may name on the base model, by name (all pages of
        ListModels). Never cached: it is asked for when a client lists models, not per request; a key's
        listings share its Authorize calls' bound at the control plane (MAX_AUTHORIZE_IN_FLIGHT_PER_KEY), so
        that a loop of them is not a query per call in flight there."""
        async with self._key_gate(api_key):
            return await self._list_models(api_key, base_model)

    async def _list_models(self, api_key: str, base_model: str) -> list[ListedModel]:
        listed: list[ListedModel] = []
        page_token = ""
        while True:
            request = worker_pb2.ListModelsRequest(
                api_key=api_key, base_model=base_model, page_size=LIST_MODELS_PAGE_SIZE, page_token=page_token
            )
            try:
                response = await self._stub.ListModels(
                    request, metadata=self._metadata, timeout=AUTHORIZE_TIMEOUT_S
                )
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                    return []  # a control plane that predates ListModels: the base model only
                raise ControlPlaneError.from_rpc(error, "ListModels") from None
            listed += [ListedModel(m.name, m.kind, m.owned_by, m.created_at.seconds) for m in response.models]
            page_token = response.next_page_token
            if not page_token:
                return listed

    async def reserve_request_id(
        self, tenant_id: str, request_id: str, worker_id: str, ttl_ms: int, renewal: bool = False
    ) -> None:
        """Reserves the tenant's client request id for this worker's stream, atomically across workers.
        Raises ControlPlaneError: ALREADY_EXISTS when it was billed or another worker serves it now;
        UNAVAILABLE when the control plane (or its database) cannot answer within AUTHORIZE_TIMEOUT_S of
        the call. Never cached: the answer changes as soon as a request under that id is billed. The
        reservations asked for while calls are under way go together in the next (ReserveRequestIds: one
        call and one transaction for a burst of streams, not one each). Against a control plane that
        predates batches, one ReserveRequestId each; against one that predates reservations, only the
        billed check (CheckRequestId). `renewal`: the stream holds the id already (a renewal), and keeps
        what it gets even if it goes away meanwhile (its usage may still wait in the spool)."""
        if not self._can_reserve:
            await self.check_request_id(tenant_id, request_id)
            return
        request = worker_pb2.ReserveRequestIdRequest(
            tenant_id=tenant_id, request_id=request_id, worker_id=worker_id, ttl_ms=ttl_ms
        )
        loop = asyncio.get_running_loop()
        if loop.time() < self._batches_unsupported_until:
            await self._reserve_one(request)
            return
        answer = loop.create_future()
        entry = _WaitingReservation(request, answer, loop.time() + AUTHORIZE_TIMEOUT_S)
        self._reservations_waiting.append(entry)
        if self._reserving is None or self._reserving.done():
            self._reserving = asyncio.create_task(self._send_reservations())
        # The caller's own deadline, as a call of its own would have (not that of a call it waited behind,
        # then its batch's). An entry not sent by then never is. One answered later is kept if reserved:
        # the caller's stream goes on unreserved (as after a call of its own past its deadline), and the
        # reservation is its; released only when a first reservation's caller went away (no stream).
        try:
            await asyncio.wait_for(asyncio.shield(answer), AUTHORIZE_TIMEOUT_S)
        except TimeoutError:
            answer.cancel()
            raise _unavailable("ReserveRequestIds: DEADLINE_EXCEEDED") from None
        except asyncio.CancelledError:
            entry.caller_gone = not renewal
            answer.cancel()
            raise

    async def _send_reservations(self) -> None:
        """Sends the waiting reservations, at most MAX_RESERVATIONS_PER_CALL a call and
        MAX_RESERVATION_CALLS_IN_FLIGHT calls at a time, until none waits; entries whose caller gave up
        are left out."""
        calls = self._reservation_calls
        while self._reservations_waiting:
            await calls.acquire()
            batch: list[_WaitingReservation] = []
            while self._reservations_waiting and len(batch) < MAX_RESERVATIONS_PER_CALL:
                entry = self._reservations_waiting.popleft()
                if not entry.answer.done():
                    batch.append(entry)
            if not batch:
                calls.release()
                continue
            self._spawn(self._reserve_batch(batch)).add_done_callback(lambda _: calls.release())

    async def _reserve_batch(self, batch: list[_WaitingReservation]) -> None:
        """One ReserveRequestIds call for `batch`; settles each entry's answer."""
        loop = asyncio.get_running_loop()
        timeout = max(0.1, max(entry.deadline for entry in batch) - loop.time())
        try:
            response = await self._stub.ReserveRequestIds(
                worker_pb2.ReserveRequestIdsRequest(entries=[entry.request for entry in batch]),
                metadata=self._metadata,
                timeout=timeout,
            )
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                # An older control plane (or one behind a proxy that is): one call each for a while.
                self._batches_unsupported_until = loop.time() + BATCHES_RETRY_S
                waiting = [entry for entry in batch if not entry.answer.done()]
                answers = await asyncio.gather(
                    *(self._reserve_one(entry.request) for entry in waiting), return_exceptions=True
                )
                for entry, answer in zip(waiting, answers, strict=True):
                    if not entry.answer.done():
                        if isinstance(answer, BaseException):
                            entry.answer.set_exception(answer)
                        else:
                            entry.answer.set_result(None)
                return
            # The call as a whole failed: no entry's own answer, so none is the caller's fault.
            _fail_all(batch, _unavailable(f"ReserveRequestIds: {error.code().name}"))
            return
        except BaseException:
            _fail_all(batch, _unavailable("ReserveRequestIds: the worker is closing"))
            raise
        outcomes = list(response.outcomes)
        if len(outcomes) != len(batch):
            _fail_all(batch, _unavailable("ReserveRequestIds: not one answer per entry"))
            return
        for entry, outcome in zip(batch, outcomes, strict=True):
            reserved = outcome.code == grpc.StatusCode.OK.value[0]
            if entry.answer.done():
                if reserved and entry.caller_gone:  # nothing serves the id: give it back, not after the TTL
                    self._release_unused(entry.request)
            elif reserved:
                entry.answer.set_result(None)
            else:
                entry.answer.set_exception(_outcome_error(outcome))

    def _release_unused(self, request: worker_pb2.ReserveRequestIdRequest) -> None:
        async def release() -> None:
            try:
                await self.release_request_id(request.tenant_id, request.request_id, request.worker_id)
            except ControlPlaneError as error:
                log.info("reservation of a call that gave up not released (it lapses): %s", error.message)

        self._spawn(release())

    def _spawn(self, call) -> asyncio.Task:
        """`call` run as a task the client keeps until it ends (and cancels when it closes)."""
        task = asyncio.create_task(call)
        self._reservation_tasks.add(task)
        task.add_done_callback(self._reservation_tasks.discard)
        return task

    async def _reserve_one(self, request: worker_pb2.ReserveRequestIdRequest) -> None:
        try:
            await self._stub.ReserveRequestId(request, metadata=self._metadata, timeout=AUTHORIZE_TIMEOUT_S)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                self._can_reserve = False
                await self.check_request_id(request.tenant_id, request.request_id)
                return
            raise ControlPlaneError.from_rpc(error, "ReserveRequestId") from None

    async def release_request_id(self, tenant_id: str, request_id: str, worker_id: str) -> None:
        """Gives back this worker's reservation of the id (its stream delivered nothing)."""
        if not self._can_reserve:
            return
        request = worker_pb2.ReleaseRequestIdRequest(
            tenant_id=tenant_id, request_id=request_id, worker_id=worker_id
        )
        try:
            await self._stub.ReleaseRequestId(request, metadata=self._metadata, timeout=AUTHORIZE_TIMEOUT_S)
        except grpc.RpcError as error:
            raise ControlPlaneError.from_rpc(error, "ReleaseRequestId") from None

    async def release_worker_request_ids(self, worker_id: str, keep: list[tuple[str, str]]) -> int:
        """Gives back every reservation of this worker except those of `keep` ((tenant id, request id));
        returns how many were removed (0 from a control plane that predates the call)."""
        if not self._can_reserve:
            return 0
        request = worker_pb2.ReleaseWorkerRequestIdsRequest(
            worker_id=worker_id,
            keep=[worker_pb2.RequestIdKey(tenant_id=t, request_id=r) for t, r in keep],
        )
        try:
            response = await self._stub.ReleaseWorkerRequestIds(
                request, metadata=self._metadata, timeout=AUTHORIZE_TIMEOUT_S
            )
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                return 0
            raise ControlPlaneError.from_rpc(error, "ReleaseWorkerRequestIds") from None
        return response.released

    async def check_request_id(self, tenant_id: str, request_id: str) -> None:
        """Raises ControlPlaneError(ALREADY_EXISTS) when the tenant's usage already holds this request id.
        Never cached: the answer changes as soon as a request under that id is billed."""
        request = worker_pb2.CheckRequestIdRequest(tenant_id=tenant_id, request_id=request_id)
        try:
            await self._stub.CheckRequestId(request, metadata=self._metadata, timeout=AUTHORIZE_TIMEOUT_S)
        except grpc.RpcError as error:
            raise ControlPlaneError.from_rpc(error, "CheckRequestId") from None

    def forget_names(self, api_key: str, names: tuple[str, ...]) -> int:
        """Drops this key's cached answers that resolve any of these names (its own view of them changed:
        the control plane said NOT_FOUND). Other keys' answers stay: names are unique per tenant only.
        Returns how many answers were dropped."""
        self._forget_count(api_key)
        wanted = set(names)
        doomed = [key for key in self._keys_of_api_key.get(api_key, ()) if wanted & set(key[1])]
        cached = sum(key in self._auth_cache for key in doomed)
        for key in doomed:
            self._drop(key)
        return cached

    def forget_adapter(self, adapter_id: str, sha256: str = "") -> int:
        """Drops every cached answer that resolved to this adapter (deleted or replaced) or to this saved
        mix, or to a saved mix with it as a member, and with `sha256` (content no adapter serves any more)
        every answer that resolved to that content; returns how many."""
        self._forgets += 1
        if not adapter_id and not sha256:
            return 0
        doomed = [
            key
            for key, (_, answer) in list(self._auth_cache.items())
            if any(
                (adapter_id and adapter_id in a.adapter_ids()) or (sha256 and sha256 in a.sha256s())
                for a in answer.adapters
            )
        ]
        for key in doomed:
            self._drop(key)
        return len(doomed)

    def forget_api_key_id(self, api_key_id: str) -> int:
        """Drops every cached answer for the api key of this id (revoked); returns how many."""
        self._forgets += 1
        if not api_key_id:
            return 0
        dropped = 0
        for key in list(self._keys_of_api_key_id.get(api_key_id, ())):
            dropped += key in self._auth_cache  # index entries of answers the cache dropped on its own go too
            self._answered_keys.pop(key[0], None)
            self._drop(key)
        return dropped

    @property
    def num_cached_answers(self) -> int:
        return len(self._auth_cache)

    async def fetch_artifact(self, sha256: str) -> AsyncIterator[worker_pb2.FetchArtifactResponse]:
        call = self._stub.FetchArtifact(
            worker_pb2.FetchArtifactRequest(sha256=sha256), metadata=self._metadata, timeout=FETCH_TIMEOUT_S
        )
        chunks = aiter(call)
        try:
            while True:
                try:
                    chunk = await asyncio.wait_for(anext(chunks), FETCH_STALL_S)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise ControlPlaneError(
                        grpc.StatusCode.UNAVAILABLE,
                        f"control plane unavailable (FetchArtifact: no data for {FETCH_STALL_S:g} s); retry shortly",
                    ) from None
                yield chunk
        except grpc.RpcError as error:
            raise ControlPlaneError.from_rpc(error, "FetchArtifact") from None
        finally:
            call.cancel()

    async def report_usage(self, records: list[UsageRecord]) -> None:
        request = worker_pb2.ReportUsageRequest(events=[_usage_event(r) for r in records])
        try:
            await self._stub.ReportUsage(request, metadata=self._metadata, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as error:
            raise ControlPlaneError.from_rpc(error, "ReportUsage") from None

    def _forget_count(self, api_key: str) -> None:
        """Counts a forget of `api_key`'s answers for its calls in flight (none: nothing to count)."""
        if self._asking_per_key.get(api_key):
            self._key_forgets[api_key] = self._key_forgets.get(api_key, 0) + 1

    def knows_key(self, api_key: str) -> bool:
        """Whether an answer for this key (for any names) was cached within AUTH_RECENT_S and not
        forgotten since: a key the control plane accepted moments ago."""
        return api_key in self._answered_keys

    def tenant_of(self, api_key: str) -> str | None:
        """The tenant id of a key `knows_key` knows (None for another)."""
        return self._answered_keys.get(api_key)

    def _forget_key(self, api_key: str) -> None:
        self._forget_count(api_key)
        self._answered_keys.pop(api_key, None)
        for key in list(self._keys_of_api_key.get(api_key, ())):
            self._drop(key)

    def _store(self, key: tuple[str, tuple[str, ...]], entry: tuple[float, Authorization]) -> None:
        """Caches an answer, within its tenant's quota (the tenant's oldest answer leaves past it)."""
        self._drop(key)
        tenant = entry[1].tenant_id
        self._auth_cache[key] = entry
        self._keys_of_api_key.setdefault(key[0], set()).add(key)
        if entry[1].api_key_id:
            self._keys_of_api_key_id.setdefault(entry[1].api_key_id, set()).add(key)
            self._api_key_id_of_key[key] = entry[1].api_key_id
        self._tenant_of_key[key] = tenant
        held = self._keys_of_tenant.setdefault(tenant, OrderedDict())
        held[key] = None
        while len(held) > self._tenant_quota:
            self._drop(next(iter(held)))
        if len(self._tenant_of_key) > 2 * self._auth_cache.maxsize:
            # Answers the cache dropped on its own (expired, evicted): their index entries go too, so the
            # indexes stay within twice the cache (amortized: a sweep leaves at most the cache's size).
            for stale in [k for k in self._tenant_of_key if k not in self._auth_cache]:
                self._drop(stale)

    def _drop(self, key: tuple[str, tuple[str, ...]]) -> None:
        """Removes a cached answer and its index entries (nothing when there is none)."""
        self._auth_cache.pop(key, None)
        keys = self._keys_of_api_key.get(key[0])
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._keys_of_api_key[key[0]]
        key_id = self._api_key_id_of_key.pop(key, None)
        by_id = self._keys_of_api_key_id.get(key_id) if key_id is not None else None
        if by_id is not None:
            by_id.discard(key)
            if not by_id:
                del self._keys_of_api_key_id[key_id]
        tenant = self._tenant_of_key.pop(key, None)
        held = self._keys_of_tenant.get(tenant) if tenant is not None else None
        if held is not None:
            held.pop(key, None)
            if not held:
                del self._keys_of_tenant[tenant]


_STATUS_OF_CODE = {status.value[0]: status for status in grpc.StatusCode}


@dataclass
class _WaitingReservation:
    request: worker_pb2.ReserveRequestIdRequest
    answer: asyncio.Future
    deadline: float  # event-loop time at which its caller gives up
    caller_gone: bool = False  # cancelled: no stream serves the id


def _unavailable(what: str) -> ControlPlaneError:
    return ControlPlaneError(
        grpc.StatusCode.UNAVAILABLE, f"control plane unavailable ({what}); retry shortly"
    )


def _fail_all(batch: list[_WaitingReservation], error: ControlPlaneError) -> None:
    for entry in batch:
        if not entry.answer.done():
            entry.answer.set_exception(error)


def _outcome_error(outcome: worker_pb2.RequestIdOutcome) -> ControlPlaneError:
    """One entry's refusal of ReserveRequestIds, as its own ReserveRequestId call would have raised it."""
    code = _STATUS_OF_CODE.get(outcome.code, grpc.StatusCode.UNKNOWN)
    if code in _PASS_THROUGH:
        return ControlPlaneError(code, outcome.message or code.name.lower())
    return ControlPlaneError(
        grpc.StatusCode.UNAVAILABLE,
        f"control plane unavailable (ReserveRequestIds: {code.name}); retry shortly",
    )


def _resolved(a: worker_pb2.ResolvedAdapter) -> ResolvedAdapter:
    mix = None
    if a.HasField("mix"):
        mix = ResolvedMix(
            members=tuple(
                (_resolved(m.adapter) if m.HasField("adapter") else None, m.weight) for m in a.mix.members
            ),
            method=a.mix.method,
            density=a.mix.density if a.mix.HasField("density") else None,
            majority_sign_method=a.mix.majority_sign_method,
            combine=a.mix.combine,
        )
    return ResolvedAdapter(
        a.name, a.adapter_id, a.sha256, a.size_bytes, a.rank, a.keep_warm, mix, a.cache_scope
    )


def _usage_event(record: UsageRecord) -> worker_pb2.UsageEvent:
    finished_at = Timestamp()
    finished_at.FromNanoseconds(int(record.finished_at * 1e9))
    return worker_pb2.UsageEvent(
        request_id=record.request_id,
        tenant_id=record.tenant_id,
        adapters=[worker_pb2.UsageAdapter(adapter_id=a, weight=w) for a, w in record.adapters],
        worker_id=record.worker_id,
        base_model=record.base_model,
        prompt_tokens=record.prompt_tokens,
        completion_tokens=record.completion_tokens,
        queue_ms=record.queue_ms,
        ttft_ms=record.ttft_ms,
        total_ms=record.total_ms,
        finished_at=finished_at,
        finish_reason=record.finish_reason,
        request_kind=record.request_kind,
        mix_name=record.mix_name,
    )
