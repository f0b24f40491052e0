"""Checks on an EngineRequest before it is queued; every failure is a typed error naming the field."""

from __future__ import annotations

import functools
import hashlib
import json
import math
from pathlib import Path

from data_plane.engine.errors import AdapterLoadError, InvalidRequest
from data_plane.engine.request import AdapterRef, EngineRequest
from openlora.adapter_format import AdapterFormatError, served_rank
from openlora.artifact import CONFIG_FILE
from openlora.exhaustion import exhausted_resource

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_MIX_MEMBERS = 8


def adapter_key(adapters: tuple[AdapterRef, ...], tenant: str = "") -> str | None:
    """The cache key of what a request runs: None (base), the adapter's own key, or a mix's key. A mix's
    key holds the `tenant` that asked, as a merge's does: its public members have the same keys for every
    caller, and a shared mix was found on the device by another tenant asking for the same members and
    weights (telling it that someone had used exactly that recipe)."""
    if not adapters:
        return None
    if len(adapters) == 1 and adapters[0].weight == 1.0:
        return adapters[0].key
    members = [[a.key, float(a.weight)] for a in adapters]
    spec = json.dumps([tenant, members] if tenant else members)
    return "mix:" + hashlib.sha256(spec.encode()).hexdigest()


@functools.lru_cache(maxsize=4096)
def _served_rank(key: str, path: Path) -> int:
    return served_rank(path)


def rank_problem(rank: int, max_lora_rank: int) -> str:
    """Why an adapter whose largest rank is `rank` cannot take a slot of this worker."""
    return (
        f"its largest rank, {rank} (`r` or a `rank_pattern` entry), exceeds this worker's maximum of "
        f"{max_lora_rank} (--max-lora-rank)"
    )


def rank_of(ref: AdapterRef) -> int:
    """`served_rank` of an adapter's files, read once per cache key (the files under a key are one
    content): every request would otherwise parse its config and its weights' header again."""
    return _served_rank(ref.key, ref.path)


def validate_request(
    request: EngineRequest, vocab_size: int, max_model_len: int, max_lora_rank: int, has_tokenizer: bool
) -> None:
    if not request.request_id:
        raise InvalidRequest("request_id", "must not be empty")
    prompt = request.prompt_token_ids
    if not prompt:
        raise InvalidRequest("prompt", "is empty")
    if len(prompt) >= max_model_len:
        raise InvalidRequest(
            "prompt", f"{len(prompt)} tokens leave no room to generate within max_model_len={max_model_len}"
        )
    if any(not 0 <= t < vocab_size for t in prompt):
        raise InvalidRequest("prompt_token_ids", f"token ids must lie in [0, {vocab_size})")
    _validate_sampling(request, max_model_len, has_tokenizer)
    _validate_adapters(request.adapters, max_lora_rank)


def _validate_sampling(request: EngineRequest, max_model_len: int, has_tokenizer: bool) -> None:
    s = request.sampling
    if not 1 <= s.max_tokens <= max_model_len:
        raise InvalidRequest("sampling.max_tokens", f"must lie in [1, {max_model_len}], got {s.max_tokens}")
    if not math.isfinite(s.temperature) or s.temperature < 0:
        raise InvalidRequest("sampling.temperature", f"must be a finite number >= 0, got {s.temperature}")
    if not (math.isfinite(s.top_p) and 0 < s.top_p <= 1):
        raise InvalidRequest("sampling.top_p", f"must lie in (0, 1], got {s.top_p}")
    if s.top_k < 0:
        raise InvalidRequest("sampling.top_k", f"must be >= 0, got {s.top_k}")
    if not (math.isfinite(s.repetition_penalty) and s.repetition_penalty > 0):
        raise InvalidRequest("sampling.repetition_penalty", f"must be > 0, got {s.repetition_penalty}")
    if len(s.stop) > MAX_STOP_STRINGS or any(len(x) > MAX_STOP_CHARS for x in s.stop):
        raise InvalidRequest("sampling.stop", f"at most {MAX_STOP_STRINGS} strings of {MAX_STOP_CHARS} chars")
    if s.stop and not has_tokenizer:
        raise InvalidRequest("sampling.stop", "stop strings need a model with tokenizer.json")


def _validate_adapters(adapters: tuple[AdapterRef, ...], max_lora_rank: int) -> None:
    field = "mix" if len(adapters) > 1 else "adapter"
    if len(adapters) > MAX_MIX_MEMBERS:
        raise InvalidRequest("mix", f"at most {MAX_MIX_MEMBERS} adapters")
    if len({a.key for a in adapters}) != len(adapters):
        raise InvalidRequest("mix", "names an adapter twice")
    total_rank = 0
    for ref in adapters:
        if not math.isfinite(ref.weight):
            raise InvalidRequest(f"{field}.weight", f"must be finite, got {ref.weight}")
        config_path = ref.path / CONFIG_FILE
        if not config_path.is_file():
            raise AdapterLoadError(field, f"adapter directory {ref.path.name!r} has no {CONFIG_FILE}")
        try:
            total_rank += rank_of(ref)
        except AdapterFormatError as e:
            raise AdapterLoadError(f"{field}.{e.field}", e.reason) from None
        except OSError as e:
            if exhausted_resource(e):  # the worker is overloaded (out of files, memory): not the adapter
                raise
            unread = Path(e.filename).name if e.filename else CONFIG_FILE  # the config, or the weights
            raise AdapterLoadError(f"{field}.{unread}", f"cannot be read: {e.strerror}") from None
    if total_rank > max_lora_rank:
        if len(adapters) > 1:
            raise InvalidRequest("mix", f"the adapters' ranks add up to {total_rank}, above {max_lora_rank}")
        raise AdapterLoadError("adapter", rank_problem(total_rank, max_lora_rank))
