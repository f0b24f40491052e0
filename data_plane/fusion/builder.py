"""build_merge: a MergeSpec's sources on disk -> one derived PEFT LoRA directory, module by module.

The derived directory is an ordinary adapter (`adapter_config.json` with r = lora_alpha = rank, so its
scale is 1, and `adapter_model.safetensors` with lora_A (rank, in) / lora_B (out, rank) per module), so
the engine loads and serves it like any other: one slot, the same SGMV pass.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from data_plane.adapters.peft_reader import open_weights
from data_plane.engine.errors import AdapterLoadError, InvalidRequest
from data_plane.fusion.merge import MemberFactors, NonFiniteMerge, merge_module
from data_plane.fusion.spec import MergeSpec
from openlora.adapter_format import DEFAULT_MAX_SIZE_BYTES, AdapterFormatError, validate_adapter_dir
from openlora.artifact import CONFIG_FILE, WEIGHTS_FILE
from openlora.base_model import PROJECTIONS, BaseModelSpec

log = logging.getLogger(__name__)
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_HALF_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16}


class MergeBuildError(AdapterLoadError):
    """A merge could not be built from its sources (a source unreadable or refused); `field` says which,
    and `source_key` the cache key of the source at fault (`mix[i]` counts the spec's sorted sources: the
    caller renames it to the member's place in its request, `renamed`). An AdapterLoadError, so a caller
    sees FAILED_PRECONDITION naming the member, as for an adapter this worker refuses."""

    def __init__(self, field: str, reason: str, source_key: str | None = None) -> None:
        super().__init__(field, reason)
        self.source_key = source_key

    def renamed(self, position: int) -> MergeBuildError:
        """The same error, naming the source as the request's `mix[position]`."""
        field = f"mix[{position}]" + self.field.partition("]")[2]
        return MergeBuildError(field, self.reason, self.source_key)


class MergeWriteError(Exception):
    """The merge was computed but its directory could not be written (read-only, out of space): a fault of
    this worker's disk, not of the request (UNAVAILABLE: retry here later or on another worker)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"the worker cannot write merged adapters now ({reason}); retry shortly")
        self.reason = reason


@dataclass(frozen=True)
class MergeReport:
    """What a build produced and what the re-factorization cost."""

    rank: int
    num_modules: int
    delta_norm: float  # ||D||_F over every module's merged delta
    error_norm: float  # ||D - B @ A||_F over every module
    max_module_error: float  # the largest per-module relative error
    build_ms: float

    @property
    def relative_error(self) -> float:
        """Frobenius error of the whole merge relative to its norm (0 when nothing was truncated)."""
        return self.error_norm / self.delta_norm if self.delta_norm > 0 else 0.0


def merged_rank(source_ranks: list[int], max_rank: int) -> int:
    """The re-factorized rank: min(max_rank, sum of the sources' ranks)."""
    return min(max_rank, sum(source_ranks))


def tensor_name(layer: int, module: str, which: str) -> str:
    parent = "self_attn" if module in _ATTENTION else "mlp"
    return f"base_model.model.model.layers.{layer}.{parent}.{module}.lora_{which}.weight"


def build_merge(
    spec: MergeSpec, out_dir: Path, max_rank: int, base: BaseModelSpec | None = None
) -> MergeReport:
    """Merges `spec`'s sources (each with its local `path`) into the PEFT directory `out_dir`, written
    into a temporary directory beside it and renamed into place once complete and valid. Holds one
    module's merged delta at a time. Raises MergeBuildError naming the source at fault,
    or InvalidRequest("mix") when the members' weighted deltas overflow float32."""
    started = time.monotonic()
    infos = []
    for i, source in enumerate(spec.sources):
        if source.path is None:
            raise ValueError(f"source {source.key[:12]} has no local path")
        try:
            infos.append(validate_adapter_dir(source.path, base, max_rank=max_rank, check_values=False))
        except AdapterFormatError as error:
            raise MergeBuildError(f"mix[{i}].{error.field}", error.reason, source.key) from None
    rank = merged_rank([info.rank for info in infos], max_rank)
    # Written in the sources' dtype when they share a half one (computed in float32 regardless).
    dtypes = {info.dtype for info in infos}
    out_dtype = _HALF_DTYPES.get(dtypes.pop(), torch.float32) if len(dtypes) == 1 else torch.float32
    # (layer, module) -> {which: tensor name}, per source
    names = [{(t.layer, t.module, t.which): t.name for t in info.tensors} for info in infos]
    modules = sorted(
        {(t.layer, t.module) for info in infos for t in info.tensors},
        key=lambda lm: (lm[0], PROJECTIONS.index(lm[1])),
    )
    tensors = {}
    delta_sq = error_sq = 0.0
    max_module_error = 0.0
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(open_weights(s.path / WEIGHTS_FILE)) for s in spec.sources]
        for layer, module in modules:
            members = [
                MemberFactors(
                    a=handle.get_tensor(source_names[(layer, module, "A")]).float(),
                    b=handle.get_tensor(source_names[(layer, module, "B")]).float(),
                    scale=info.scaling_of(layer, module),
                    weight=source.weight,
                    seed=spec.member_seed(layer, module, source.key),
                )
                for source, info, handle, source_names in zip(
                    spec.sources, infos, handles, names, strict=True
                )
                if (layer, module, "A") in source_names
            ]
            try:
                merged = merge_module(
                    members,
                    spec.method,
                    spec.density,
                    spec.majority_sign_method or "total",
                    rank,
                    svd_seed=spec.member_seed(layer, module, "svd"),
                )
            except NonFiniteMerge as error:  # what the caller mixed, not this worker: INVALID_ARGUMENT
                raise InvalidRequest("mix", f"layer {layer} {module}: {error}") from None
            tensors[tensor_name(layer, module, "A")] = merged.a.to(out_dtype).contiguous()
            tensors[tensor_name(layer, module, "B")] = merged.b.to(out_dtype).contiguous()
            delta_sq += merged.delta_norm**2
            error_sq += merged.error_norm**2
            max_module_error = max(max_module_error, merged.relative_error)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": rank,
        "use_rslora": False,
        "bias": "none",
        "target_modules": [m for m in PROJECTIONS if any(mod == m for _, mod in modules)],
        "lora_dropout": 0.0,
    }
    # The engine loads adapters up to DEFAULT_MAX_SIZE_BYTES: a float32 merge of a large model at a high
    # rank may exceed it, and is then kept in bfloat16 (half the bytes).
    if sum(t.numel() * t.element_size() for t in tensors.values()) > DEFAULT_MAX_SIZE_BYTES - (1 << 20):
        tensors = {name: t.to(torch.bfloat16) for name, t in tensors.items()}
    _write(out_dir, config, tensors, base, max_rank)
    return MergeReport(
        rank=rank,
        num_modules=len(modules),
        delta_norm=math.sqrt(delta_sq),
        error_norm=math.sqrt(error_sq),
        max_module_error=max_module_error,
        build_ms=(time.monotonic() - started) * 1000,
    )


@contextlib.contextmanager
def _writing():
    """The disk failing under a merge's files (read-only, out of space; safetensors raises its own error
    for a failed write) as a MergeWriteError."""
    try:
        yield
    except OSError as error:
        raise MergeWriteError(error.strerror or str(error)) from error
    except SafetensorError as error:
        raise MergeWriteError(str(error)[:200]) from error


def _write(out_dir: Path, config: dict, tensors: dict, base: BaseModelSpec | None, max_rank: int) -> None:
    out_dir = Path(out_dir)
    with _writing():
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".partial-{out_dir.name[:12]}-", dir=out_dir.parent))
    try:
        with _writing():
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
            save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            for name in (CONFIG_FILE, WEIGHTS_FILE):
                with open(tmp / name, "rb") as f:
                    os.fsync(f.fileno())
        # The engine's own checks will pass: the same validator every adapter goes through.
        try:
            validate_adapter_dir(tmp, base, max_rank=max_rank)
        except AdapterFormatError as error:
            raise MergeBuildError(
                f"mix.{error.field}", f"the merged adapter is refused: {error.reason}"
            ) from None
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not out_dir.is_dir():  # another builder of the same spec won: its copy is as good
                with _writing():
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
