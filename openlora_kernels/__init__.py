"""Batched multi-adapter LoRA ops (SGMV): Triton on CUDA, the pure-torch reference on CPU.

    u = sgmv_shrink(x, lora_a, seg_indptr, seg_slots, slot_ranks=None)        # (T, R)
    sgmv_expand(u, lora_b, seg_indptr, seg_slots, y, scale, slot_ranks=None)  # y (T, H_out) += ...

Both take keywords a caller that builds its layout once per step passes to every call:
``max_segment_rows`` (the longest segment, known on the host: the Triton path needs no device sync to
validate and size its grid, the values are then trusted), ``use_triton`` (the implementation, resolved
once with ``use_triton(device)``; None reads ``OPENLORA_KERNELS`` on this call) and ``plan`` (the
reference's ``SegmentPlan`` of the layout, from ``plan_segments``; None builds it on this call).

Segment g covers rows ``seg_indptr[g]:seg_indptr[g + 1]`` and uses adapter slot ``seg_slots[g]``
(-1: no adapter). See ``openlora_kernels.reference`` for the exact semantics.

``OPENLORA_KERNELS`` selects the implementation: ``triton`` forces Triton (on CPU tensors this needs
``TRITON_INTERPRET=1`` set before the Triton kernels are first imported), ``reference`` forces the
reference, unset or ``auto`` picks by device. The engine reads it once per step, when it builds the
step's metadata, and passes the answer down.
"""

from __future__ import annotations

import os

import torch

from openlora.kernel_choice import kernel_choice as checked_choice
from openlora_kernels import reference
from openlora_kernels.reference import SegmentPlan

__all__ = [
    "SegmentPlan",
    "kernel_choice",
    "plan_segments",
    "reference",
    "sgmv_expand",
    "sgmv_shrink",
    "triton_runs_on",
    "use_triton",
]


def kernel_choice() -> str:
    """OPENLORA_KERNELS checked: "auto", "triton" or "reference" (ValueError naming the variable otherwise)."""
    # The one environment read outside an entry point: tests and operators switch the implementation
    # without rebuilding the engine's config, so it is read when a step's metadata is built (or per call
    # by callers that pass no choice).
    return checked_choice(os.environ)


def triton_runs_on(device: str) -> bool:
    """Whether the Triton kernels can run on ``device`` ("cpu", "cuda" or "cuda:N"): on CUDA, or on the CPU
    under Triton's interpreter (``TRITON_INTERPRET=1``, as the tests run them). Elsewhere their first
    launch fails (Triton finds no driver)."""
    if device.startswith("cuda"):
        return True
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    try:
        from triton import knobs
    except ImportError:  # Triton before 3.4 has no knobs: its interpreter reads the variable itself
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return bool(knobs.runtime.interpret)


def use_triton(device: torch.device, choice: str | None = None) -> bool:
    """True when calls on tensors of ``device`` go to the Triton kernels under ``choice`` (a
    ``kernel_choice()`` the caller read; None reads it here)."""
    choice = kernel_choice() if choice is None else choice
    if choice == "auto":
        return device.type == "cuda"
    return choice == "triton"


def plan_segments(
    seg_bounds: list[int],
    seg_slots: list[int],
    device: torch.device,
    slot_ranks: list[int] | None = None,
) -> SegmentPlan:
    """The reference's plan of a segment layout given as host lists (seg_indptr (G+1,) and seg_slots
    (G,) values): built once per step and passed as ``plan`` to every shrink/expand of the step.
    ``slot_ranks`` (indexed by slot): each adapter's rank, so that a segment's matmul covers only the
    pool columns its rank fills."""
    return SegmentPlan(seg_bounds, seg_slots, device, slot_ranks)


def sgmv_shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    seg_indptr: torch.Tensor,
    seg_slots: torch.Tensor,
    slot_ranks: torch.Tensor | None = None,
    *,
    max_segment_rows: int | None = None,
    use_triton: bool | None = None,
    plan: SegmentPlan | None = None,
    rank_columns: int = 1,
) -> torch.Tensor:
    """u (T, R) = x (T, H_in) @ lora_a[slot] (R, H_in).T per segment; rows of slot -1 are zero.

    ``max_segment_rows``: the longest segment, when the caller knows it from host-side metadata; the
    Triton path then skips its index checks and their device sync (see ``openlora_kernels.triton_ops``).
    ``use_triton`` and ``plan`` as in the module docstring. ``rank_columns``: columns of u per unit of
    adapter rank (a fused group's rank-interleaved pool has one per slice); the reference uses it with a
    plan that knows the slots' ranks, Triton has ``slot_ranks`` for that.
    """
    if _triton_chosen(use_triton, x.device):
        from openlora_kernels.triton_ops.sgmv_shrink import sgmv_shrink as triton_shrink

        return triton_shrink(x, lora_a, seg_indptr, seg_slots, slot_ranks, max_segment_rows=max_segment_rows)
    return reference.sgmv_shrink(
        x, lora_a, seg_indptr, seg_slots, slot_ranks, plan=plan, rank_columns=rank_columns
    )


def sgmv_expand(
    u: torch.Tensor,
    lora_b: torch.Tensor,
    seg_indptr: torch.Tensor,
    seg_slots: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    slot_ranks: torch.Tensor | None = None,
    *,
    max_segment_rows: int | None = None,
    use_triton: bool | None = None,
    plan: SegmentPlan | None = None,
    rank_columns: int = 1,
) -> None:
    """y (T, H_out) += scale[slot] * u (T, R) @ lora_b[slot] (H_out, R).T per segment, in place.

    ``max_segment_rows``, ``use_triton``, ``plan`` and ``rank_columns`` as for ``sgmv_shrink``.
    """
    if _triton_chosen(use_triton, u.device):
        from openlora_kernels.triton_ops.sgmv_expand import sgmv_expand as triton_expand

        triton_expand(
            u, lora_b, seg_indptr, seg_slots, y, scale, slot_ranks, max_segment_rows=max_segment_rows
        )
        return
    reference.sgmv_expand(
        u, lora_b, seg_indptr, seg_slots, y, scale, slot_ranks, plan=plan, rank_columns=rank_columns
    )


def _triton_chosen(choice: bool | None, device: torch.device) -> bool:
    return use_triton(device) if choice is None else choice
