"""LLMEngine: wires scheduler, model runner, adapter cache and loader, sampler and detokenizer.

Drive it with `add_request` and `step`; each step returns the new tokens of every request that
advanced, and a final output for each request that finished, failed or was aborted.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from data_plane.engine.adapter_cache import DEVICE, DISK, HOST, AdapterCache, AdapterState
from data_plane.engine.adapter_loader import CAUSE_PREFETCH, CAUSE_REQUEST, AdapterLoader, FinishedLoad
from data_plane.engine.block_manager import BlockManager
from data_plane.engine.config import EngineConfig
from data_plane.engine.ensemble import combine, normalized_weights, validate_ensemble
from data_plane.engine.errors import EngineError, InvalidRequest, NonFiniteLogits, QueueFull, StepFailed
from data_plane.engine.host_memory import keep_freed_memory
from data_plane.engine.intra_op import use_threads
from data_plane.engine.model_runner import ModelRunner
from data_plane.engine.request import EngineRequest, RequestOutput
from data_plane.engine.sampler import Sampler
from data_plane.engine.scheduler import Scheduler, SchedulerLimits
from data_plane.engine.sequence import Sequence, SequenceStatus
from data_plane.engine.validation import adapter_key, validate_request
from data_plane.model.config import ModelConfig
from data_plane.model.loader import load_model
from data_plane.tokenizer import IncrementalDetokenizer, Tokenizer
from openlora.base_model import BaseModelSpec
from openlora.cache_scope import content_of

log = logging.getLogger(__name__)
_IDLE_LOAD_WAIT_S = 0.05
# Past this (or twice what the last pruning kept), the record of what mixes were built from keeps only the
# keys the cache knows, which the cache bounds (`AdapterCache.max_idle_usage_records`).
_MAX_MIX_MEMBERS = 4096
# The longest a step waits for the loads that waiting requests hold a slot for: copies from host memory,
# and disk reads under way (each read at most once: a slow disk must not hold step after step).
_LOAD_WAIT_S = 0.01
_TIER_ORDER = ("none", "device", "host", "disk")  # fastest first
# Prefetch accounting keys (`prefetch_stats`): (event, tier) or (PREFETCH_SKIPPED, reason).
PREFETCH_PERFORMED, PREFETCH_WASTED, PREFETCH_SKIPPED = "performed", "wasted", "skipped"
PREFETCH_HELD = "held"  # already in the asked tier or a warmer one, or a load of it is in flight
PREFETCH_NO_ROOM = "no_room"  # the host tier could not keep it until its predicted use


@dataclass(frozen=True)
class RequestValidator:
    """The checks a request must pass before it is queued, against the engine's fixed limits."""

    vocab_size: int
    max_model_len: int
    max_lora_rank: int
    has_tokenizer: bool
    max_num_seqs: int
    num_adapter_slots: int
    num_kv_blocks: int
    block_size: int
    max_num_batched_tokens: int | None

    def validate(self, request: EngineRequest) -> None:
        """Raises InvalidRequest or AdapterLoadError for a request that can never run."""
        validate_request(request, self.vocab_size, self.max_model_len, self.max_lora_rank, self.has_tokenizer)
        if request.ensemble is not None:
            if request.adapters:
                raise InvalidRequest("mix", "an ensemble carries its adapters in its members only")
            longest = min(len(request.prompt_token_ids) + request.sampling.max_tokens, self.max_model_len)
            validate_ensemble(
                request.ensemble,
                self.max_lora_rank,
                self.max_num_seqs,
                self.num_adapter_slots,
                self.num_kv_blocks,
                -(-longest // self.block_size),
                max_num_batched_tokens=self.max_num_batched_tokens,
            )


@dataclass
class _RequestState:
    request: EngineRequest
    seq: Sequence
    detokenizer: IncrementalDetokenizer | None
    generator: torch.Generator
    # Adapter key -> the tier it came from when this request got its slot: "device" when it was usable
    # on arrival, else the source ("host" or "disk") of the load that made it ready before admission.
    adapter_tiers: dict[str, str]
    scheduled_at: float | None = None
    first_token_at: float | None = None
    adapter_load_ms: float = 0.0
    # An ensemble's normalized member weights (None: not an ensemble).
    ensemble_weights: list[float] | None = None

    @property
    def cache_tier(self) -> str:
        """The slowest tier among its adapters (an ensemble's coldest member); "none" without adapters."""
        return max(self.adapter_tiers.values(), key=_TIER_ORDER.index, default="none")


def _field_of(state: _RequestState) -> str:
    """The request field a request's non-finite logits are blamed on: its adapters' field as the server
    named it, else read off them (one adapter at weight 1: "adapter"; a mix or ensemble: "mix"), or
    "prompt" on the base model."""
    request = state.request
    adapters = request.adapters
    if request.ensemble is None and not adapters:
        return "prompt"
    single = request.ensemble is None and len(adapters) == 1 and adapters[0].weight == 1.0
    return request.adapters_field or ("adapter" if single else "mix")


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        keep_freed_memory()  # a step's temporaries are not page-faulted in again every step
        # The intra-op thread count of the thread that builds the engine: every thread that steps it uses
        # it (`_use_own_threads`), whatever count that thread would have taken itself (intra_op).
        self.intra_op_threads = torch.get_num_threads()
        self._stepping_thread: threading.Thread | None = None
        dtype = config.resolve_dtype(ModelConfig.from_dir(config.model_dir).checkpoint_dtype)
        device = config.torch_device
        model_len = config.max_model_len or 1 << 20
        model, model_config = load_model(config.model_dir, dtype, device, max_positions=1, quant=config.quant)
        self.model_config = model_config
        max_model_len = min(model_len, model_config.max_model_len)
        num_blocks = config.resolve_num_kv_blocks(
            ModelRunner.kv_bytes_per_block(model, config.block_size, dtype)
        )
        # A sequence must always fit the cache on its own, or preemption could not make room for it.
        self.max_model_len = min(max_model_len, num_blocks * config.block_size)
        model.model.rotary.max_positions = self.max_model_len
        model.model.rotary.build(device)
        self.runner = ModelRunner(
            model, num_blocks, config.block_size, config.num_adapter_slots, config.max_lora_rank
        )
        self.adapter_cache = AdapterCache(config.num_adapter_slots, config.resolved_host_cache_bytes)
        self.scheduler = Scheduler(
            SchedulerLimits(config.max_num_seqs, config.max_num_batched_tokens),
            BlockManager(num_blocks, config.block_size),
            self.adapter_cache,
        )
        self.loader = AdapterLoader(
            model_config.spec,
            config.max_lora_rank,
            dtype,
            install=self.runner.install_from_host,
            reserved_slot=self.adapter_cache.reserved_slot,
            pin_memory=device.type == "cuda",
            read_delay_s=config.adapter_read_delay_s,
        )
        # The member keys a mix's key was built from, by key: invalidating a member (or its content) drops
        # the mixes built from it too. Pruned to the keys the cache knows as it grows.
        self._mix_members: dict[str, frozenset[str]] = {}
        self._mix_members_kept = 0  # how many the last pruning kept
        # Cache commands from other threads (prewarm hints): applied by the engine thread at each step.
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        # Finished adapter loads by (cause, source tier): "request"/"prefetch", "disk"/"host"; with their
        # summed duration (read + copy), so an operator can tell whether prewarms land and what loads cost.
        self.load_counts: Counter[tuple[str, str]] = Counter()
        self.load_ms_sums: Counter[tuple[str, str]] = Counter()
        # Prefetches performed by destination tier and skipped by reason (wasted ones: the cache counts).
        self.prefetch_counts: Counter[tuple[str, str]] = Counter()
        self.sampler = Sampler()
        tokenizer_path = config.model_dir / "tokenizer.json"
        self.tokenizer = (
            Tokenizer.from_dir(config.model_dir, model_config.eos_token_ids)
            if tokenizer_path.is_file()
            else None
        )
        self._eos_token_ids = set(model_config.eos_token_ids)
        # What `validate` checks a request against: fixed once the engine is built, so a copy of it checks
        # requests in another process too (the engine core's front).
        self.request_validator = RequestValidator(
            vocab_size=self.spec.vocab_size,
            max_model_len=self.max_model_len,
            max_lora_rank=config.max_lora_rank,
            has_tokenizer=self.tokenizer is not None,
            max_num_seqs=config.max_num_seqs,
            num_adapter_slots=config.num_adapter_slots,
            num_kv_blocks=num_blocks,
            block_size=config.block_size,
            max_num_batched_tokens=config.max_num_batched_tokens,
        )
        self._states: dict[str, _RequestState] = {}
        self._pending_outputs: list[RequestOutput] = []
        self._reads_awaited: set[str] = set()  # disk reads in flight a step already waited for
        # Each request without a seed samples from a generator of its own, seeded from here: its tokens
        # never depend on what other requests (other tenants') drew, and without `config.seed` they
        # differ from one process to the next.
        self._unseeded_seeds = random.SystemRandom() if config.seed is None else random.Random(config.seed)
        log.info(
            "engine ready: %d KV blocks of %d tokens, max_model_len %d",
            num_blocks,
            config.block_size,
            self.max_model_len,
        )

    @property
    def spec(self) -> BaseModelSpec:
        return self.model_config.spec

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    def has_unfinished(self) -> bool:
        """True while a step has work: requests, outputs to hand out, cache commands or loads in flight."""
        return (
            self.scheduler.has_unfinished()
            or bool(self._pending_outputs)
            or not self._commands.empty()
            or self.loader.num_in_flight > 0
        )

    def resident_adapter_keys(self) -> list[str]:
        """Adapters READY in a slot, most recently used first: a snapshot, safe from any thread."""
        return list(self.adapter_cache.residency.device_keys)

    def host_adapter_keys(self) -> list[str]:
        """Adapters with a copy in host memory: a snapshot, safe from any thread."""
        return list(self.adapter_cache.residency.host_keys)

    def read_ahead(self, request: EngineRequest) -> int:
        """Safe from any thread (a request's arrival, while a step runs): begins the disk reads of the
        request's adapters that are in no slot, in no host copy and not loading, so that their loads,
        started once the engine thread takes the request in, find them read (`AdapterLoader.read_ahead`).
        Returns how many began."""
        residency = self.adapter_cache.residency
        warm = set(residency.device_keys) | set(residency.host_keys)
        if request.ensemble is not None:
            wanted = [
                (m.adapter.key, (m.adapter,)) for m in request.ensemble.members if m.adapter is not None
            ]
        elif request.adapters:
            wanted = [(adapter_key(request.adapters, request.tenant), tuple(request.adapters))]
        else:
            wanted = []
        begun = 0
        for key, members in wanted:
            if key not in warm and not self.loader.is_loading(key):
                begun += self.loader.read_ahead(key, members)
        return begun

    def validate(self, request: EngineRequest) -> None:
        """Raises InvalidRequest or AdapterLoadError for a request that can never run; reads no engine state
        that changes, so another thread may call it."""
        self.request_validator.validate(request)

    def set_between_layers(self, hook: Callable[[], None] | None) -> None:
        """`hook` runs on the engine's thread after each decoder layer of a step's forward pass (None:
        nothing). It may add requests (`add_request`), and must not touch the running batch."""
        self.runner.model.between_layers = hook

    def add_request(self, request: EngineRequest) -> None:
        self.validate(request)
        if request.request_id in self._states:
            raise InvalidRequest("request_id", f"{request.request_id!r} is already running")
        if self.scheduler.num_waiting >= self.config.max_waiting:
            raise QueueFull(f"{self.scheduler.num_waiting} requests are waiting")
        seq = self._sequences_of(request)
        sampling = request.sampling
        seed = sampling.seed if sampling.seed is not None else self._unseeded_seeds.getrandbits(64)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        detokenizer = (
            IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, sampling.stop)
            if self.tokenizer
            else None
        )
        cache = self.adapter_cache
        # Until a load makes it ready for this request (`_install_finished_loads`), where it is now.
        tiers = {
            s.adapter_key: cache.tier_of(s.adapter_key) for s in seq.members if s.adapter_key is not None
        }
        state = _RequestState(request, seq, detokenizer, generator, tiers)
        if request.ensemble is not None:
            state.ensemble_weights = normalized_weights(request.ensemble)
        self._states[request.request_id] = state
        self.scheduler.add(seq)
        # Its adapter's load starts now (a copy from host memory, or a disk read), not when a step's
        # schedule gets to it: a copy from host memory is then done by the step's admission.
        failed, error = self._start_loads(self.scheduler.pin_adapters())
        if error is not None:
            self._pending_outputs += self.fail_requests(failed, StepFailed("the engine failed this request"))

    @staticmethod
    def _sequences_of(request: EngineRequest) -> Sequence:
        """The sequence of a request; for an ensemble, the first of its group of K (one per member)."""
        prompt = request.prompt_token_ids
        if request.ensemble is None:
            key = adapter_key(request.adapters, request.tenant)
            return Sequence(request.request_id, list(prompt), len(prompt), key, tenant=request.tenant)
        group: list[Sequence] = []
        for member in request.ensemble.members:
            key = member.adapter.key if member.adapter is not None else None
            group.append(
                Sequence(
                    request.request_id, list(prompt), len(prompt), key, group=group, tenant=request.tenant
                )
            )
        return group[0]

    def abort(self, request_id: str) -> None:
        state = self._states.pop(request_id, None)
        if state is None:
            return
        self.scheduler.finish(state.seq)
        self._pending_outputs.append(self._output(state, [], "", None, "abort", time.monotonic()))

    def _use_own_threads(self) -> None:
        """Sets the engine's intra-op thread count on the thread that steps it, once per thread."""
        thread = threading.current_thread()
        if thread is not self._stepping_thread:
            use_threads(self.intra_op_threads)
            self._stepping_thread = thread

    def step(self) -> list[RequestOutput]:
        """Runs one batch; returns the new tokens of every request that advanced and the final output of
        each that finished, failed or was aborted.

        A fault fails only the requests the step involves (`fail_requests`: with the fault when it is an
        EngineError, else StepFailed), whose outputs come with the next step, then propagates so that the
        caller can tell a passing fault from an engine that cannot go on. A row with non-finite logits
        fails that request alone (NonFiniteLogits) and the step goes on.
        """
        self._use_own_threads()
        outputs, self._pending_outputs = self._pending_outputs, []
        involved: list[str] = []  # request ids a fault now would fail
        try:
            self._apply_commands()
            self._install_finished_loads(outputs)
            self._await_loads(outputs)
            batch = self.scheduler.schedule()
            failed, load_error = self._start_loads(batch.loads)
            if load_error is not None:
                involved += failed
                raise load_error
            if batch.is_empty:
                if self.loader.num_in_flight:
                    self.loader.wait(_IDLE_LOAD_WAIT_S)
                return outputs
            involved = [seq.request_id for seq in batch.seqs]
            now = time.monotonic()
            slots = []
            for seq in batch.seqs:
                state = self._states[seq.request_id]
                if state.scheduled_at is None:
                    state.scheduled_at = now
                    if len(state.adapter_tiers) == 1:  # what its adapter's tier cost it (eviction's cost)
                        (tier,) = state.adapter_tiers.values()
                        self.adapter_cache.record_wait(tier, (now - state.request.arrival_time) * 1000)
                slots.append(-1 if seq.adapter_key is None else self.adapter_cache.slot_of(seq.adapter_key))
            self.runner.clear_blocks(self.scheduler.blocks.take_freed())
            sample_ids, logits = self.runner.run(batch.seqs, batch.num_tokens, slots)
            for seq, num_tokens in zip(batch.seqs, batch.num_tokens, strict=True):
                seq.num_computed_tokens += num_tokens
            if not sample_ids:
                return outputs
            sampled = [batch.seqs[i] for i in sample_ids]
            sampled, logits = self._combine_ensembles(sampled, logits)
            states = [self._states[seq.request_id] for seq in sampled]
            token_ids, logprobs = self.sampler(
                logits,
                [s.request.sampling for s in states],
                [s.generator for s in states],
                [seq.token_ids for seq in sampled],
            )
            now = time.monotonic()
            for state, token_id, logprob in zip(states, token_ids, logprobs, strict=True):
                if token_id is None:  # its logits were NaN or infinite: this request fails, not the batch
                    outputs += self.fail_requests(
                        [state.request.request_id], NonFiniteLogits(_field_of(state))
                    )
                    continue
                outputs.append(self._append_token(state, token_id, logprob, now))
            return outputs
        except Exception as error:
            cause = error if isinstance(error, EngineError) else StepFailed("the engine failed this request")
            if cause is not error:
                cause.__cause__ = error  # the server tells overload (out of files, memory) by the cause
            self._pending_outputs[:0] = outputs + self.fail_requests(involved, cause)
            raise

    def _start_loads(self, loads: list[tuple[str, int]]) -> tuple[list[str], Exception | None]:
        """Starts the loads of slots just reserved. One that cannot start fails its adapter's waiting
        requests (the others load): returns their ids and the first such error."""
        failed: list[str] = []
        first_error: Exception | None = None
        for key, _slot in loads:
            try:
                self._start_load(key)
            except Exception as error:
                log.exception("adapter %s: starting its load failed", key[:12])
                failed += [seq.request_id for seq in self.scheduler.fail_adapter(key)]
                first_error = first_error or error
        return failed, first_error

    def _await_loads(self, outputs: list[RequestOutput]) -> None:
        """Waits (at most _LOAD_WAIT_S) for the loads that waiting requests hold a slot for, so that they
        are admitted in this step rather than the next: a copy from host memory takes a fraction of a step,
        and so does what is left of a disk read begun at the request's arrival (while the step runs it
        shares the cores with the step's threads; waiting, it has one to itself), while waiting for the next
        step costs a whole one. A read is waited for by one step at most: one on a slow disk does not
        hold every step until it ends."""
        loader = self.loader
        if self._reads_awaited:
            self._reads_awaited = {key for key in self._reads_awaited if loader.is_loading(key)}
        if len(self.scheduler.running) >= self.config.max_num_seqs:
            return  # nothing could be admitted this step anyway
        keys = set()
        for seq in self.scheduler.waiting:
            key = seq.adapter_key
            if not seq.holds_adapter or not loader.is_loading(key):
                continue
            if loader.is_copying_from_host(key):
                keys.add(key)
            elif key not in self._reads_awaited:
                keys.add(key)
                self._reads_awaited.add(key)
        if keys:
            loader.wait_for(keys, _LOAD_WAIT_S)
            self._install_finished_loads(outputs)

    def _combine_ensembles(
        self, sampled: list[Sequence], logits: torch.Tensor
    ) -> tuple[list[Sequence], torch.Tensor]:
        """Sampled sequences and their logits (N, V) -> one row per request (U, V): an ensemble's K member
        rows become one row of its combined log-probabilities, under its first member. Ensembles of the
        same K and combine are combined in one batched call."""
        if all(seq.group is None for seq in sampled):
            return sampled, logits
        row_of = {id(seq): i for i, seq in enumerate(sampled)}
        # The scheduler runs a group whole with one token count: every member of a sampled group is here.
        units = [seq for seq in sampled if seq.is_leader]
        device = logits.device
        out = logits.new_empty((len(units), logits.shape[1]), dtype=torch.float32)  # (U, V)
        solo = [u for u, seq in enumerate(units) if seq.group is None]
        if solo:
            rows = torch.tensor([row_of[id(units[u])] for u in solo], device=device)
            out[torch.tensor(solo, device=device)] = logits[rows].float()
        batches: dict[tuple[int, str], list[int]] = {}
        for u, seq in enumerate(units):
            if seq.group is not None:
                ensemble = self._states[seq.request_id].request.ensemble
                batches.setdefault((len(seq.group), ensemble.combine), []).append(u)
        for (_, method), positions in batches.items():
            member_rows = [[row_of[id(m)] for m in units[u].group] for u in positions]
            weights = [self._states[units[u].request_id].ensemble_weights for u in positions]
            combined = combine(logits[torch.tensor(member_rows, device=device)], weights, method)  # (G, V)
            out[torch.tensor(positions, device=device)] = combined
        return units, out

    def fail_requests(self, request_ids: list[str], error: Exception) -> list[RequestOutput]:
        """Ends these requests with `error` (finish_reason "abort"), giving back their KV blocks and
        adapter references; returns their final outputs. Ids that already ended are skipped."""
        now = time.monotonic()
        failed = []
        for request_id in request_ids:
            state = self._states.pop(request_id, None)
            if state is None:
                continue
            self.scheduler.finish(state.seq)
            failed.append(self._output(state, [], "", None, "abort", now, error=error))
        return failed

    def _append_token(self, state: _RequestState, token_id: int, logprob: float, now: float) -> RequestOutput:
        seq, sampling = state.seq, state.request.sampling
        for member in seq.members:  # an ensemble's token goes to all its members
            member.token_ids.append(token_id)
        if state.first_token_at is None:
            state.first_token_at = now
        text = ""
        reason = None
        is_eos = token_id in self._eos_token_ids
        detokenizer = state.detokenizer
        if detokenizer is not None and not is_eos:
            text = detokenizer.add(token_id)
        if is_eos or (detokenizer is not None and detokenizer.stopped):
            reason = "stop"
        elif seq.num_output_tokens >= sampling.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is not None:
            if detokenizer is not None:
                text += detokenizer.flush()
                if detokenizer.stopped:  # a stop string in text held back for an incomplete character
                    reason = "stop"
            self.scheduler.finish(seq)
            del self._states[seq.request_id]
        if not sampling.logprobs:
            return self._output(state, [token_id], text, None, reason, now)
        # No tokenizer: no text. The end token adds no text: it begins where the text ends.
        offset = 0 if detokenizer is None else len(detokenizer.text) if is_eos else detokenizer.last_offset
        return self._output(state, [token_id], text, [logprob], reason, now, text_offsets=[offset])

    # -- adapter tiers -----------------------------------------------------------------------------------

    def prefetch(
        self,
        key: str,
        members: tuple,
        to_device: bool = False,
        deadline_at: float | None = None,
        protect: bool = True,
    ) -> None:
        """Thread-safe prewarm: bring `key` (loadable from `members`, AdapterRefs) into host memory, or into
        a free device slot when `to_device`; `deadline_at` (time.monotonic()) is when it is expected.
        `protect`: keep it until then (a periodic prediction); False (a burst) leaves it to the host
        tier's ranking by value, like an adapter no hint names, and reads no host copy of one that is in a
        slot (`_prefetch_now`)."""
        self._commands.put(("prefetch", key, tuple(members), to_device, deadline_at, protect))

    def demote(self, key: str) -> None:
        """Thread-safe: forget a prewarm deadline and let `key` leave its slot (its host copy stays)."""
        self._commands.put(("demote", key))

    def invalidate(self, key: str) -> None:
        """Thread-safe: drop `key` (and the linear mixes built from it) from every tier at the next step.
        Requests that wait for it load it
        afresh from their own files; running ones finish on the slot they hold, which is freed after
        them (a slot is never pulled from under a running batch)."""
        self._commands.put(("invalidate", key))

    def invalidate_content(self, sha256: str) -> None:
        """Thread-safe: `invalidate` every key of the content `sha256`, in every cache scope
        (openlora/cache_scope.py): what a worker does once no adapter serves that content any more."""
        self._commands.put(("invalidate_content", sha256))

    def set_keep_warm(self, key: str, holder: str, keep_warm: bool) -> None:
        """Thread-safe: adapter `holder` asks for `key` to stay warm (or no longer does); a key some
        adapter asks for never leaves host memory once there."""
        self._commands.put(("keep_warm", key, holder, keep_warm))

    def _apply_commands(self) -> None:
        cache = self.adapter_cache
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            kind, key = command[0], command[1]
            if kind == "prefetch":
                _, _, members, to_device, deadline_at, protect = command
                if protect:
                    cache.hint(key, deadline_at)
                self._prefetch_now(key, members, to_device, protect)
            elif kind == "demote":
                cache.demote(key)
            elif kind in ("invalidate", "invalidate_content"):
                # Reads begun ahead are no cache entries yet: a key (or a mix of it) read ahead goes too.
                ahead = self.loader.keys_read_ahead()
                if kind == "invalidate":
                    doomed = {key}
                else:  # with the reads begun ahead of requests the cache does not know yet
                    doomed = {k for k in [*cache.known_keys(), *ahead] if content_of(k) == key}
                self._prune_mix_members(cache.known_keys())
                for mix, members in [*self._mix_members.items(), *ahead.items()]:
                    if members & doomed or (kind == "invalidate_content" and key in map(content_of, members)):
                        doomed.add(mix)
                for doomed_key in sorted(doomed):
                    self._invalidate_now(doomed_key)
            elif kind == "keep_warm":
                cache.set_keep_warm(key, command[2], command[3])

    def _prefetch_now(self, key: str, members: tuple, to_device: bool, protect: bool = True) -> None:
        """A prefetch (its hint already recorded): into a free slot when `to_device`, else into host memory,
        or nothing at all, counted as skipped by reason, when the adapter is already in host memory or on
        its way ("held"), or when the host tier could not keep it until its predicted use ("no_room":
        decided before any disk read, from the size its file headers give).

        For a protected prediction (`protect`: a call expected at a deadline, maybe a while ahead) a
        device slot alone does not hold it: the next admission may take an unreferenced slot, and an
        adapter leaving its slot without a host copy drops to disk. One in a slot without a host copy gets
        a host copy read, so that it is still warm when its predicted call comes. An unprotected one (a
        burst: calls are coming now) in a slot is held: a host copy would take the room of an adapter that
        has no other copy, while this one's slot keeps it as long as its calls keep coming."""
        cache = self.adapter_cache
        in_slot = cache.state(key) is not None
        if self.loader.is_loading(key) or (in_slot and (cache.on_host(key) or not protect)):
            self._skip_prefetch(key, PREFETCH_HELD)
            return
        slot = cache.prefetch(key) if to_device and not in_slot and cache.num_free_slots else None
        if slot is not None:
            log.debug("adapter prefetch started to=slot key=%s", key[:12])
            self._start_load(key, CAUSE_PREFETCH, members)
            return
        if cache.on_host(key):
            self._skip_prefetch(key, PREFETCH_HELD)
            return
        size = cache.known_size(key)
        if size is None:
            size = self.loader.estimate_host_bytes(members)
        if size is not None and not cache.can_host(key, size):
            self._skip_prefetch(key, PREFETCH_NO_ROOM)
            return
        log.debug("adapter prefetch started to=host key=%s", key[:12])
        # Disk -> host only: an adapter READY in a slot keeps it as it is.
        self._submit(key, members, cause=CAUSE_PREFETCH, host_only=cache.state(key) is not None)

    def _skip_prefetch(self, key: str, reason: str) -> None:
        self.prefetch_counts[(PREFETCH_SKIPPED, reason)] += 1
        log.debug("adapter prefetch skipped reason=%s key=%s", reason, key[:12])

    def prefetch_stats(self) -> dict[tuple[str, str], int]:
        """Prefetch accounting, safe to read from any thread (copies): ("performed", tier) loads a prefetch
        brought into "host" memory or a "device" slot, ("wasted", tier) those that left that tier before
        any request used them, ("skipped", reason) prefetches not started ("held", "no_room")."""
        stats = dict(self.prefetch_counts)
        for tier, count in dict(self.adapter_cache.wasted_prefetches).items():
            stats[(PREFETCH_WASTED, tier)] = count
        return stats

    def _submit(self, key: str, members: tuple, **options) -> None:
        """`loader.submit`, remembering what a mix's key was built from."""
        if members and any(member.key != key for member in members):
            self._mix_members[key] = frozenset(member.key for member in members)
            if len(self._mix_members) > max(_MAX_MIX_MEMBERS, 2 * self._mix_members_kept):
                self._prune_mix_members(self.adapter_cache.known_keys())
        self.loader.submit(key, members, **options)

    def _prune_mix_members(self, known_keys: list[str]) -> None:
        known = set(known_keys)
        self._mix_members = {k: v for k, v in self._mix_members.items() if k in known}
        self._mix_members_kept = len(self._mix_members)

    def _invalidate_now(self, key: str) -> None:
        """Drops `key` from the tiers: waiting requests give back their reference (each gets a fresh load
        from its own files), a load in flight is kept from landing, running requests finish on their slot."""
        self.scheduler.release_waiting(key)
        self.loader.mark_stale(key)
        self.adapter_cache.invalidate(key)

    def _source_of(self, key: str) -> tuple | None:
        """The AdapterRefs a waiting request gives for `key` (it holds their files), or None."""
        for state in self._states.values():
            if state.seq.status is not SequenceStatus.WAITING:
                continue
            if state.request.ensemble is not None:
                for member in state.request.ensemble.members:
                    if member.adapter is not None and member.adapter.key == key:
                        return (member.adapter,)
            elif state.seq.adapter_key == key:
                return state.request.adapters
        return None

    def _start_load(self, key: str, cause: str = CAUSE_REQUEST, members: tuple | None = None) -> None:
        """A slot was reserved for `key`: load it there from its host copy, else from disk (`members`, by
        default those of a request waiting for it). A load already in flight carries on; its completion
        starts the copy into the slot."""
        if self.loader.is_loading(key):
            return
        cache = self.adapter_cache
        host = cache.host_buffer(key)
        members = members if members is not None else self._source_of(key)
        if members is None and host is None:
            cache.fail(key)  # nothing waits for it any more, and there is nothing to load it from
            return
        self._submit(key, members or (), host=host, cause=cause)

    def _install_finished_loads(self, outputs: list[RequestOutput]) -> None:
        cache = self.adapter_cache
        for load in self.loader.collect():
            now = time.monotonic()
            if load.stale:
                self._load_again_or_free(load.key)  # invalidated while it loaded: nothing of it is kept
                continue
            if load.error is not None:
                log.warning("adapter %s failed to load (%s): %s", load.key[:12], load.cause, load.error)
                if load.cause == CAUSE_PREFETCH:  # requests that came meanwhile load from their own files
                    self._load_again_or_free(load.key)
                    continue
                for seq in self.scheduler.fail_adapter(load.key):
                    state = self._states.pop(seq.request_id)
                    outputs.append(self._output(state, [], "", None, "abort", now, error=load.error))
                continue
            self._record_load_event(load)
            host_prefetch = load.cause == CAUSE_PREFETCH and load.slot is None
            if host_prefetch:
                self.prefetch_counts[(PREFETCH_PERFORMED, HOST)] += 1
            if load.read_from_disk:
                self._keep_on_host(load, prefetched=host_prefetch)
            elif load.slot is not None:
                cache.record_load(HOST, load.host.size_bytes, load.copy_ms)
            if cache.state(load.key) is not AdapterState.LOADING:
                continue  # a host-only load nothing reserved a slot for
            if load.slot is None:  # a request reserved a slot meanwhile: copy this buffer into it
                self._submit(load.key, load.members, host=load.host, started_at=load.started_at)
                continue
            if cache.mark_ready(load.key) is None:
                continue  # retired while it loaded
            if load.cause == CAUSE_PREFETCH:
                self.prefetch_counts[(PREFETCH_PERFORMED, DEVICE)] += 1
            for state in self._states.values():
                if load.key in state.adapter_tiers and state.scheduled_at is None:
                    # Its slot is filled from here: host memory or disk, whatever the tier was on arrival.
                    state.adapter_tiers[load.key] = load.source_tier
                    state.adapter_load_ms = (now - max(load.started_at, state.request.arrival_time)) * 1000

    def _load_again_or_free(self, key: str) -> None:
        """A load of `key` ended without a usable result. A slot reserved for it is loaded again from a
        waiting request's own files, or freed when it retires or nothing waits for it."""
        cache = self.adapter_cache
        if cache.state(key) is not AdapterState.LOADING:
            return
        if cache.is_retiring(key):
            cache.fail(key)  # its waiting requests were released: they get a fresh entry next step
            return
        self._start_load(key)

    def _record_load_event(self, load: FinishedLoad) -> None:
        event = (load.cause, load.source_tier)
        self.load_counts[event] += 1
        self.load_ms_sums[event] += load.read_ms + load.copy_ms
        log.debug(
            "adapter load cause=%s tier=%s to=%s key=%s read_ms=%.1f copy_ms=%.1f",
            load.cause,
            load.source_tier,
            "slot" if load.slot is not None else "host",
            load.key[:12],
            load.read_ms,
            load.copy_ms,
        )

    def _keep_on_host(self, load: FinishedLoad, prefetched: bool) -> None:
        """Hands a buffer read from disk to the adapter cache, which keeps it if the host budget allows
        (`prefetched`: a host-tier prefetch read it, and counts as wasted if it cannot be kept)."""
        cache = self.adapter_cache
        size = load.host.size_bytes
        cache.record_load(DISK, size, load.read_ms)
        evicted = cache.store_host(load.key, size, load.host, prefetched=prefetched)
        if evicted is None:
            log.debug("adapter host declined key=%s", load.key[:12])
        for victim in evicted or ():
            log.debug("adapter host evicted key=%s for=%s", victim[:12], load.key[:12])

    def _output(
        self,
        state: _RequestState,
        token_ids: list[int],
        text: str,
        logprobs: list[float] | None,
        reason: str | None,
        now: float,
        error: Exception | None = None,
        text_offsets: list[int] | None = None,
    ) -> RequestOutput:
        arrival = state.request.arrival_time
        scheduled = state.scheduled_at if state.scheduled_at is not None else now
        first_token = state.first_token_at if state.first_token_at is not None else now
        return RequestOutput(
            request_id=state.request.request_id,
            new_token_ids=token_ids,
            new_text=text,
            new_logprobs=logprobs,
            finished=reason is not None,
            finish_reason=reason,
            prompt_tokens=state.seq.num_prompt_tokens,
            completion_tokens=state.seq.num_output_tokens,
            queue_ms=(scheduled - arrival) * 1000,
            adapter_load_ms=state.adapter_load_ms,
            ttft_ms=(first_token - arrival) * 1000,
            total_ms=(now - arrival) * 1000,
            cache_tier=state.cache_tier,
            error=error,
            new_text_offsets=text_offsets,
        )

    def shutdown(self) -> None:
        self.loader.shutdown()
