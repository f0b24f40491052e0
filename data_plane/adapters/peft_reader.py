"""read_peft_adapter: validate a PEFT LoRA directory, then load its factors as tensors."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from data_plane.adapters.weights import AdapterWeights, LoraFactors
from data_plane.engine.errors import AdapterLoadError
from openlora.adapter_format import AdapterFormatError, validate_adapter_dir
from openlora.artifact import WEIGHTS_FILE
from openlora.base_model import BaseModelSpec
from openlora.exhaustion import exhausted_resource


def read_peft_adapter(path: Path, spec: BaseModelSpec, max_rank: int, dtype: torch.dtype) -> AdapterWeights:
    """Validates `path` against the base model, then reads every lora_A/lora_B into `dtype` CPU tensors.

    Raises AdapterLoadError(field, reason) for anything refused (missing, malformed, another base model).
    """
    try:
        info = validate_adapter_dir(path, spec, max_rank=max_rank)
    except AdapterFormatError as e:
        raise AdapterLoadError(f"adapter.{e.field}", e.reason) from None
    except OSError as e:
        if exhausted_resource(e):  # the worker is overloaded (out of files, memory): not the adapter's fault
            raise
        raise AdapterLoadError("adapter", f"cannot read {Path(path).name!r}: {e.strerror}") from None
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(Path(path) / WEIGHTS_FILE), framework="pt", device="cpu") as f:
            for t in info.tensors:
                pairs.setdefault((t.layer, t.module), {})[t.which] = f.get_tensor(t.name).to(dtype)
    except (SafetensorError, OSError) as e:
        if exhausted_resource(e):
            raise
        # The validator and safetensors disagree on the file, or it changed under us: still a refusal.
        raise AdapterLoadError(f"adapter.{WEIGHTS_FILE}", f"cannot be read: {str(e)[:200]}") from None
    factors = {key: LoraFactors(ab["A"], ab["B"], info.scaling_of(*key)) for key, ab in pairs.items()}
    return AdapterWeights(rank=info.rank, factors=factors)
