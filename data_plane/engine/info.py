"""What the worker reports about its engine (logs, metrics) without reaching into it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineInfo:
    """Fixed once the engine is built."""

    weight_format: str  # the base model's decoder linears: "none", "int8" or "int4"
    decoder_bits_per_weight: float
    weight_bytes: int  # base-model weight bytes resident on the device
    device: str
    compute_dtype: str  # e.g. "float32"
    has_tokenizer: bool


def engine_info(engine) -> EngineInfo:
    """The EngineInfo of an LLMEngine."""
    weights = engine.runner.model.weight_bytes()
    return EngineInfo(
        weight_format=engine.config.quantize,
        decoder_bits_per_weight=weights.decoder_bits_per_weight,
        weight_bytes=weights.total_bytes,
        device=str(engine.runner.device),
        compute_dtype=str(engine.runner.model.model.embed_tokens.weight.dtype).removeprefix("torch."),
        has_tokenizer=engine.tokenizer is not None,
    )


def kv_cache_usage(engine) -> float:
    """The share of an LLMEngine's KV blocks in use (one read of two plain attributes)."""
    blocks = engine.scheduler.blocks
    return 1.0 - blocks.num_free_blocks / blocks.num_blocks if blocks.num_blocks else 0.0
