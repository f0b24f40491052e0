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


@dataclass
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    adapters: tuple[AdapterRef, ...] = ()  # () base model; 1 adapter; >1 linear mix with weights
    arrival_time: float = field(default_factory=time.monotonic)


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
