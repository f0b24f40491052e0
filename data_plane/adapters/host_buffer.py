"""HostAdapter: one adapter's factors packed into one contiguous host buffer (pinned on CUDA).

A load into a slot is then one host-to-device copy of the whole buffer, followed by device-side copies
into the slot pools; views of the buffer give the factors back without copying.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from data_plane.adapters.weights import AdapterWeights, LoraFactors


@dataclass(frozen=True)
class PackedFactors:
    layer: int
    projection: str
    a_offset: int
    a_shape: tuple[int, int]  # (r, in)
    b_offset: int
    b_shape: tuple[int, int]  # (out, r)
    scale: float


@dataclass
class HostAdapter:
    buffer: torch.Tensor  # (num_elements,) contiguous, one dtype
    rank: int
    layout: tuple[PackedFactors, ...]
    # `unpack(self)`, made by its first call: a copy kept in host memory is copied into slots many times.
    _views: AdapterWeights | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def size_bytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    @property
    def shape_signature(self) -> tuple:
        """Where each factor lies in the buffer and its shape (not its scale), with the buffer's dtype:
        adapters of the same signature have views at the same places of a buffer."""
        return (
            self.buffer.dtype,
            *((p.layer, p.projection, p.a_offset, p.a_shape, p.b_offset, p.b_shape) for p in self.layout),
        )


def pack(weights: AdapterWeights, pin_memory: bool) -> HostAdapter:
    """Copies every factor of `weights` into one flat buffer (pinned when `pin_memory`)."""
    factors = sorted(weights.factors.items())
    total = sum(f.a.numel() + f.b.numel() for _, f in factors)
    dtype = factors[0][1].a.dtype if factors else torch.float32
    buffer = torch.empty(total, dtype=dtype, pin_memory=pin_memory)
    layout = []
    offset = 0
    for (layer, projection), f in factors:
        a_offset, offset = offset, offset + f.a.numel()
        buffer[a_offset:offset].copy_(f.a.reshape(-1))
        b_offset, offset = offset, offset + f.b.numel()
        buffer[b_offset:offset].copy_(f.b.reshape(-1))
        layout.append(
            PackedFactors(layer, projection, a_offset, tuple(f.a.shape), b_offset, tuple(f.b.shape), f.scale)
        )
    return HostAdapter(buffer, weights.rank, tuple(layout))


def unpack(host: HostAdapter, buffer: torch.Tensor | None = None) -> AdapterWeights:
    """The factors as views of `buffer` (the host buffer itself, or a device copy of it)."""
    if buffer is None and host._views is not None:
        return host._views
    flat = host.buffer if buffer is None else buffer
    factors = {}
    for p in host.layout:
        a = flat[p.a_offset : p.a_offset + p.a_shape[0] * p.a_shape[1]].view(p.a_shape)
        b = flat[p.b_offset : p.b_offset + p.b_shape[0] * p.b_shape[1]].view(p.b_shape)
        factors[(p.layer, p.projection)] = LoraFactors(a, b, p.scale)
    weights = AdapterWeights(rank=host.rank, factors=factors)
    if buffer is None:
        host._views = weights  # the views only read the buffer: any thread may reuse them
    return weights
