"""Up-front argument checks shared by the Triton launchers: dtypes, shapes, strides, index ranges.

Every failure raises ``KernelArgumentError`` naming the argument, before anything is launched: an
out-of-range slot or a segment past the end would otherwise read or write arbitrary device memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class KernelArgumentError(ValueError):
    """A kernel argument has the wrong dtype, shape, layout, device or values."""

    def __init__(self, argument: str, reason: str):
        super().__init__(f"{argument}: {reason}")
        self.argument = argument
        self.reason = reason


@dataclass(frozen=True)
class SegmentLayout:
    """Host-side facts about the segments, read with one device sync."""

    num_segments: int
    max_segment_rows: int


def check_float(name: str, t: torch.Tensor, ndim: int, dtype: torch.dtype | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise KernelArgumentError(name, f"expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise KernelArgumentError(name, f"expected {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise KernelArgumentError(name, f"dtype {t.dtype} not supported (float16, bfloat16, float32)")
    if dtype is not None and t.dtype != dtype:
        raise KernelArgumentError(name, f"dtype {t.dtype} differs from the input's {dtype}")


def check_rows_layout(name: str, t: torch.Tensor) -> None:
    """Rows may be strided (a view into a wider buffer); the elements of a row must be contiguous."""
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise KernelArgumentError(name, f"last dim must be contiguous, strides are {t.stride()}")


def check_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise KernelArgumentError(name, "must be contiguous")


def check_same_device(device: torch.device, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise KernelArgumentError(name, f"on {t.device}, expected {device}")


def check_path(path: str | None, layout: SegmentLayout) -> None:
    """``path`` is None (pick by shape), "segmented", or "bgmv" for segments of at most one row."""
    if path not in (None, "segmented", "bgmv"):
        raise KernelArgumentError("path", f"must be None, 'segmented' or 'bgmv', got {path!r}")
    if path == "bgmv" and layout.max_segment_rows > 1:
        raise KernelArgumentError("path", "bgmv needs segments of at most one row")


def check_segments(
    seg_indptr: torch.Tensor,
    seg_slots: torch.Tensor,
    num_rows: int,
    num_slots: int,
    rank_max: int,
    slot_ranks: torch.Tensor | None,
    max_segment_rows: int | None = None,
) -> SegmentLayout:
    """Validate the segment layout and slot ranks; return what the grid needs.

    With ``max_segment_rows`` given (the caller built the layout on the host and vouches for it), the
    value checks and their device sync are skipped; dtypes and shapes are still checked.
    """
    for name, t in (("seg_indptr", seg_indptr), ("seg_slots", seg_slots)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != 1:
            raise KernelArgumentError(name, "expected a 1-D torch.int32 tensor")
        check_contiguous(name, t)
    num_segments = seg_slots.numel()
    if seg_indptr.numel() != num_segments + 1:
        raise KernelArgumentError(
            "seg_indptr", f"length {seg_indptr.numel()} must be len(seg_slots) + 1 = {num_segments + 1}"
        )
    if slot_ranks is not None:
        if slot_ranks.dtype != torch.int32 or slot_ranks.dim() != 1 or slot_ranks.numel() != num_slots:
            raise KernelArgumentError("slot_ranks", f"expected ({num_slots},) torch.int32")
        check_contiguous("slot_ranks", slot_ranks)
    if max_segment_rows is not None:
        if not isinstance(max_segment_rows, int) or max_segment_rows < 0:
            raise KernelArgumentError("max_segment_rows", f"must be an int >= 0, got {max_segment_rows!r}")
        return SegmentLayout(num_segments, max_segment_rows)
    if num_segments == 0:
        if num_rows != 0:
            raise KernelArgumentError("seg_indptr", f"no segments but {num_rows} rows")
        return SegmentLayout(0, 0)

    lengths = seg_indptr[1:] - seg_indptr[:-1]  # (G,)
    stats = [seg_indptr[0], seg_indptr[-1], lengths.min(), lengths.max(), seg_slots.min(), seg_slots.max()]
    if slot_ranks is not None:
        stats += [slot_ranks.min(), slot_ranks.max()]
    values = torch.stack(stats).tolist()  # the one device sync
    first, last, min_len, max_len, min_slot, max_slot = values[:6]
    if first != 0 or last != num_rows:
        raise KernelArgumentError("seg_indptr", f"must run from 0 to T={num_rows}, runs {first}..{last}")
    if min_len < 0:
        raise KernelArgumentError("seg_indptr", "must be non-decreasing")
    if min_slot < -1 or max_slot >= num_slots:
        raise KernelArgumentError(
            "seg_slots", f"values must lie in [-1, {num_slots}), found {min_slot}..{max_slot}"
        )
    if slot_ranks is not None and (values[6] < 0 or values[7] > rank_max):
        raise KernelArgumentError("slot_ranks", f"values must lie in [0, R={rank_max}]")
    return SegmentLayout(num_segments, int(max_len))
