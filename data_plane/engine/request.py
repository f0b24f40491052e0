"""The request interface the server drives: options in, incremental outputs back."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    max_tokens: int = 128
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0
    logprobs: bool = False


@dataclass(frozen=True)
class AdapterRef:
    key: str  # content sha256 of the adapter artifact: the cache key
    path: Path  # local PEFT directory
    weight: float = 1.0


@dataclass(frozen=True)
class EnsembleMember:
    adapter: AdapterRef | None  # None: the base model
    weight: float  # >= 0; the members' weights are normalized when combined


@dataclass(frozen=True)
class Ensemble:
    """K members decoded in lock-step; at each step their next-token distributions are combined
    (`data_plane.engine.ensemble.combine`) and the one token sampled from it is appended to all."""

    members: tuple[EnsembleMember, ...]
    combine: str = "probs"  # "probs": p = sum w_i softmax(z_i); "logprobs": log p ~ sum w_i log_softmax(z_i)


@dataclass
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    adapters: tuple[AdapterRef, ...] = ()  # () base model; 1 adapter; >1 linear mix with weights
    arrival_time: float = field(default_factory=time.monotonic)
    # An ensemble (then `adapters` is empty): its members run as K sequences of one group.
    ensemble: Ensemble | None = None
    # Who asked (the worker passes the tenant): admission shares the running slots across tenants.
    tenant: str = ""
    # The request field that named the adapters ("adapter" or "mix"), named when they fail the request;
    # "" reads it off `adapters` (a one-member mix of weight 1 is sent as that adapter).
    adapters_field: str = ""


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[float] | None
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    prompt_tokens: int
    completion_tokens: int
    queue_ms: float
    adapter_load_ms: float
    ttft_ms: float
    total_ms: float
    cache_tier: str  # "none" | "device" | "host" | "disk"
    error: Exception | None = (
        None  # set when the request failed (e.g. AdapterLoadError); finish_reason "abort"
    )
    # Parallel to new_logprobs (None when they are): where each new token's text begins in the request's
    # output text, in characters. A token holding part of a character begins where that character does;
    # none lies past the text's end (a stop string cuts the text: its tokens begin at most there).
    new_text_offsets: list[int] | None = None
