"""QuantLinear: the one interface every quantized weight format implements.

A QuantLinear holds one projection's weight (out_features, in_features) in a packed low-bit form and
computes y = x @ W.T with it; it has no bias (the owning layer adds its own). Each format offers
`kernel(x)`, the packed kernel, and `reference(x)`, the pure-torch dequantize-then-matmul with the same
signature: the tests' oracle. `forward` runs the kernel, or the reference when `use_reference` is set:
chosen once for a whole model by `set_reference_kernels` (the loader applies `OPENLORA_KERNELS=reference`,
the switch that `kernels` reads for SGMV too), never per call.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import ClassVar

import torch
from torch import nn

from data_plane.engine import intra_op
from openlora.kernel_choice import kernel_choice

# The kernels read activations, scales and offsets in this dtype and accumulate in float32: PyTorch's
# CPU int4/int8 kernels are ~12x faster at batch 1 in bfloat16 than in float32 (benchmarks/RESULTS.md),
# and the CUDA int4 kernel takes bfloat16 only.
COMPUTE_DTYPE = torch.bfloat16
# Elements quantized at a time while a weight streams in (a multiple of whole rows): temporaries of about
# 128 KiB, which glibc serves from its heap and reuses. With 1 MiB chunks, RSS while loading an int8
# model grew by ~12 MiB per layer beyond the quantized weights (freed blocks left resident).
CHUNK_ELEMENTS = 1 << 15


class QuantizationError(ValueError):
    """A weight or device that the requested format cannot serve (names the cause and what to do)."""


class QuantLinear(nn.Module):
    """y (T, out) = x (T, in) @ W.T, W held quantized. Subclasses set `format` and `bits`."""

    format = ""
    bits = 0
    use_reference = False  # forward runs `reference` instead of `kernel` (see set_reference_kernels)
    # `load_rows` takes row blocks starting at multiples of this (a packed layout's tile of rows).
    row_multiple = 1
    # Device type -> the torch.ops.aten operators the format's kernels need there (added in different
    # torch releases: a torch without one is refused at startup, not at the first packed weight).
    required_ops: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __init__(self, in_features: int, out_features: int, device: torch.device) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.device = torch.device(device)

    @classmethod
    def check_shape(cls, in_features: int, out_features: int) -> None:
        """Raises QuantizationError (naming the cause) when the format cannot pack a weight of this shape."""

    def load_weight(self, weight: torch.Tensor) -> None:
        """Quantizes `weight` (out, in), any float dtype, on any device, a few rows at a time."""
        _check_weight_shape(weight, self.out_features, self.in_features)
        self.load_rows(0, weight)

    def load_rows(self, start: int, rows: torch.Tensor) -> None:
        """Quantizes `rows` (r, in) as output rows start:start + r of the weight. A fused projection's slices
        (q|k|v, gate|up) arrive one checkpoint tensor at a time, in any order; the weight is usable once
        every row is loaded. `start` must be a multiple of `row_multiple`."""
        raise NotImplementedError

    def _check_rows(self, start: int, rows: torch.Tensor) -> int:
        """Validates a row block for `load_rows`; returns its end row."""
        if rows.dim() != 2 or rows.shape[1] != self.in_features:
            raise ValueError(f"rows have shape {list(rows.shape)}, expected [r, {self.in_features}]")
        end = start + rows.shape[0]
        if start < 0 or end > self.out_features or start % self.row_multiple:
            raise ValueError(
                f"rows {start}:{end} do not fit {self.out_features} output rows in blocks of {self.row_multiple}"
            )
        return end

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, in) in the activation dtype -> (T, out) in the same dtype."""
        return self.reference(x) if self.use_reference else self.kernel(x)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        """The packed kernel: x (T, in) -> (T, out) in x's dtype, computed in COMPUTE_DTYPE (int8 on float32
        CPU activations: in int8 digits and int32 sums, see int8.py)."""
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """W as the kernel sees it: (out, in) float32."""
        raise NotImplementedError

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The oracle: x @ dequantize().T in float32, returned in x's dtype."""
        return (x.float() @ self.dequantize().T).to(x.dtype)

    @property
    def resident_bytes(self) -> int:
        """Bytes held for this weight: packed codes, scales and offsets."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return f"{self.format}, in_features={self.in_features}, out_features={self.out_features}"


def _check_weight_shape(weight: torch.Tensor, out_features: int, in_features: int) -> None:
    if tuple(weight.shape) != (out_features, in_features):
        raise ValueError(f"weight has shape {list(weight.shape)}, expected {[out_features, in_features]}")


class RowSlice:
    """Output rows start:start + out_features of a QuantLinear that holds a fused projection: the handle
    one checkpoint tensor (q_proj of a fused q|k|v, say) is loaded through and read back from."""

    def __init__(self, linear: QuantLinear, start: int, out_features: int) -> None:
        self.linear, self.start, self.out_features = linear, start, out_features
        self.in_features = linear.in_features

    @property
    def format(self) -> str:
        return self.linear.format

    @property
    def use_reference(self) -> bool:
        return self.linear.use_reference

    def load_weight(self, weight: torch.Tensor) -> None:
        _check_weight_shape(weight, self.out_features, self.in_features)
        self.linear.load_rows(self.start, weight)

    def dequantize(self) -> torch.Tensor:
        return self.linear.dequantize()[self.start : self.start + self.out_features]


def reference_kernels_requested() -> bool:
    """True when OPENLORA_KERNELS=reference: read once per model load, to choose every QuantLinear's path."""
    return kernel_choice(os.environ) == "reference"


def set_reference_kernels(module: nn.Module, enabled: bool) -> None:
    """Makes every QuantLinear in `module` compute with its reference (True) or its packed kernel (False)."""
    for child in module.modules():
        if isinstance(child, QuantLinear):
            child.use_reference = enabled


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Runs the block with one intra-op thread: quantizing in small chunks is many small ops, and on a
    2-core machine with other work each parallel op waited for its second thread (a 4096x1024 weight
    took 169 ms with 2 threads, 13 ms with 1). Other threads' counts are left alone (`intra_op`)."""
    with intra_op.threads(1):
        yield


def row_chunks(num_rows: int, num_cols: int, multiple: int) -> list[tuple[int, int]]:
    """[(start, end)] covering `num_rows` in chunks of about CHUNK_ELEMENTS, each a multiple of `multiple`
    rows (the last may be shorter)."""
    rows = max(multiple, CHUNK_ELEMENTS // max(num_cols, 1) // multiple * multiple)
    return [(start, min(start + rows, num_rows)) for start in range(0, num_rows, rows)]


def round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple
