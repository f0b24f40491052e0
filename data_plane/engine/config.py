"""EngineConfig: the one frozen configuration of an engine, validated on construction."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from data_plane.model.quant import FORMATS, QuantSettings

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_KV_CACHE_BYTES = 256 << 20
MAX_DEFAULT_HOST_CACHE_BYTES = 8 << 30


def default_host_cache_bytes() -> int:
    """An eighth of physical memory, at most 8 GiB: the adapter host tier's default budget."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        physical = 8 << 30
    return min(physical // 8, MAX_DEFAULT_HOST_CACHE_BYTES)


@dataclass(frozen=True)
class EngineConfig:
    model_dir: Path
    # "auto" (float32 on CPU; on CUDA float16 for a float16 checkpoint, else bfloat16) | "float32" |
    # "bfloat16" | "float16"
    dtype: str = "auto"
    device: str = "cpu"
    max_lora_rank: int = 64
    num_adapter_slots: int = 32
    kv_cache_bytes: int | None = None  # budget for the paged KV cache; num_kv_blocks wins when both are set
    num_kv_blocks: int | None = None
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_waiting: int = 1024
    max_model_len: int | None = None  # None: the model's own limit (bounded by the KV cache)
    # Seeds the per-request generators of requests that give no seed of their own: None (the default)
    # draws each from the OS's entropy, so unseeded output differs across restarts and workers.
    seed: int | None = None
    host_cache_bytes: int | None = None  # adapter host-memory tier; None: default_host_cache_bytes()
    adapter_read_delay_s: float = 0.0  # slow-storage hook for tests and benchmarks: added to each disk read
    quantize: str = "none"  # "none" | "int8" | "int4": how the decoder layers' linears are held
    quantize_lm_head: bool = False  # lm_head in the `quantize` format too (needs a format)

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.device.startswith("cpu") and self.dtype == "float16":
            raise ValueError("float16 is not supported on CPU; use float32 or bfloat16")
        for name in (
            "max_lora_rank",
            "num_adapter_slots",
            "block_size",
            "max_num_seqs",
            "max_num_batched_tokens",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_waiting < 0:
            raise ValueError("max_waiting must be >= 0")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError("num_kv_blocks must be positive")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes < 1:
            raise ValueError("kv_cache_bytes must be positive")
        if self.host_cache_bytes is not None and self.host_cache_bytes < 0:
            raise ValueError("host_cache_bytes must be >= 0")
        if self.adapter_read_delay_s < 0:
            raise ValueError("adapter_read_delay_s must be >= 0")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be at least 2")
        if self.quantize not in FORMATS:
            raise ValueError(f"quantize must be one of {', '.join(FORMATS)}, got {self.quantize!r}")
        if self.quantize_lm_head and self.quantize == "none":
            raise ValueError("quantize_lm_head needs quantize int8 or int4")

    @property
    def quant(self) -> QuantSettings:
        return QuantSettings(self.quantize, self.quantize_lm_head)

    def resolve_dtype(self, checkpoint_dtype: str) -> torch.dtype:
        """The dtype the model is held and computed in: `dtype`, or for "auto" float32 on the CPU and, on
        CUDA, the checkpoint's own half precision (`checkpoint_dtype`, its config's `dtype` /
        `torch_dtype`): a float16 checkpoint stays float16 (bfloat16 would round away three bits of every
        weight), a bfloat16 or float32 one is served in bfloat16."""
        if self.dtype != "auto":
            return _DTYPES[self.dtype]
        if not self.device.startswith("cuda"):
            return torch.float32
        return torch.float16 if checkpoint_dtype in ("float16", "half") else torch.bfloat16

    @property
    def resolved_host_cache_bytes(self) -> int:
        return default_host_cache_bytes() if self.host_cache_bytes is None else self.host_cache_bytes

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def resolve_num_kv_blocks(self, bytes_per_block: int) -> int:
        if self.num_kv_blocks is not None:
            return self.num_kv_blocks
        budget = self.kv_cache_bytes if self.kv_cache_bytes is not None else DEFAULT_KV_CACHE_BYTES
        num_blocks = budget // bytes_per_block
        if num_blocks < 1:
            raise ValueError(f"kv_cache_bytes={budget} holds no block of {bytes_per_block} bytes")
        return num_blocks
