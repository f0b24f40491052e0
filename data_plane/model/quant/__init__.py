"""Quantized base-model weights: int8 and int4 QuantLinear formats behind one interface.

    make_quant_linear("int4", in_features, out_features, device)  # a QuantLinear; load_weight(W) packs W
    check_device(QuantSettings("int4"), device)                    # refuses what the device cannot run
    check_shapes(QuantSettings("int4"), spec)                      # refuses linears it cannot pack

The formats and their kernels are documented in `int8.py` and `int4.py`; `benchmarks/RESULTS.md` holds
the measurements that chose them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from data_plane.model.quant.base import (
    COMPUTE_DTYPE,
    QuantizationError,
    QuantLinear,
    reference_kernels_requested,
    set_reference_kernels,
)
from data_plane.model.quant.int4 import Int4Linear
from data_plane.model.quant.int8 import Int8Linear
from openlora.base_model import PROJECTIONS, BaseModelSpec

__all__ = [
    "COMPUTE_DTYPE",
    "FORMATS",
    "QuantLinear",
    "QuantSettings",
    "QuantizationError",
    "check_device",
    "check_shapes",
    "make_quant_linear",
    "quant_row_multiple",
    "reference_kernels_requested",
    "set_reference_kernels",
]

_CLASSES: dict[str, type[QuantLinear]] = {"int8": Int8Linear, "int4": Int4Linear}
FORMATS = ("none", *_CLASSES)


@dataclass(frozen=True)
class QuantSettings:
    """How the base model's weights are held: `format` for every decoder-layer linear (q, k, v, o, gate,
    up, down), and for `lm_head` too when `lm_head` is set; embeddings and norms stay in the model dtype."""

    format: str = "none"
    lm_head: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise QuantizationError(
                f"unknown quantization format {self.format!r}: choose one of {', '.join(FORMATS)}"
            )
        if self.lm_head and self.format == "none":
            raise QuantizationError("quantizing lm_head needs a format: pass --quantize int8 or int4 with it")

    @property
    def enabled(self) -> bool:
        return self.format != "none"


def make_quant_linear(format: str, in_features: int, out_features: int, device: torch.device) -> QuantLinear:
    """An empty QuantLinear of `format`; its weight is given by `load_weight`."""
    if format not in _CLASSES:
        raise QuantizationError(
            f"unknown quantization format {format!r}: choose one of {', '.join(_CLASSES)}"
        )
    return _CLASSES[format](in_features, out_features, device)


def quant_row_multiple(format: str) -> int:
    """The row multiple at which `format`'s QuantLinear can start a block of rows (see `load_rows`)."""
    return _CLASSES[format].row_multiple


def check_device(settings: QuantSettings, device: torch.device) -> None:
    """Refuses, before anything is loaded, a format the device cannot run."""
    device = torch.device(device)
    if not settings.enabled:
        return
    missing = [
        name
        for name in _CLASSES[settings.format].required_ops.get(device.type, ())
        if not hasattr(torch.ops.aten, name)
    ]
    if missing:
        raise QuantizationError(
            f"--quantize {settings.format} on {device.type} needs torch.ops.aten.{', '.join(missing)}, "
            f"which torch {torch.__version__} does not have: install a newer torch, or use "
            f"--quantize {'int8 or ' if settings.format == 'int4' else ''}none"
        )
    if settings.format != "int4" or device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        raise QuantizationError(
            f"--quantize int4 needs a CUDA device of compute capability 8.0 or newer (Ampere); "
            f"{torch.cuda.get_device_name(device)} is {major}.{minor}: use --quantize int8 or none"
        )


def check_shapes(settings: QuantSettings, spec: BaseModelSpec) -> None:
    """Refuses, before anything is loaded, a model with a linear that `settings.format` cannot pack: the
    error names the projection, its shape, the cause and what to do instead."""
    if not settings.enabled:
        return
    shapes = {name: spec.projection_shape(name) for name in PROJECTIONS}  # name -> (in, out)
    if settings.lm_head:
        shapes["lm_head"] = (spec.hidden_size, spec.vocab_size)
    for name, (in_features, out_features) in shapes.items():
        try:
            _CLASSES[settings.format].check_shape(in_features, out_features)
        except QuantizationError as e:
            raise QuantizationError(
                f"--quantize {settings.format} cannot pack {name} of {spec.name} "
                f"(out_features {out_features}, in_features {in_features}): {e}; use --quantize int8 or none"
            ) from None
