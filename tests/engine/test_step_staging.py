"""StepStaging: a step's integer lists come back as tensors with their values, across steps of different
sizes that reuse (and outgrow) the preallocated buffer."""

from __future__ import annotations

import torch

from data_plane.engine.model_runner import StepStaging


def test_packed_lists_keep_their_values_while_the_buffer_is_reused_and_grown():
    staging = StepStaging(torch.int64, torch.device("cpu"), capacity=8)
    first = staging.pack([[5, 6, 7], [], [1, -1]])
    assert [t.tolist() for t in first] == [[5, 6, 7], [], [1, -1]]
    assert all(t.dtype == torch.int64 for t in first)
    big = list(range(100, 130))  # past the capacity: the buffer grows
    second = staging.pack([big, [2**40]])
    assert [t.tolist() for t in second] == [big, [2**40]]
    third = staging.pack([[9]])
    assert [t.tolist() for t in third] == [[9]]


def test_int32_staging_holds_segment_layouts():
    staging = StepStaging(torch.int32, torch.device("cpu"), capacity=4)
    indptr, slots = staging.pack([[0, 3, 4, 9], [2, -1, 7]])
    assert indptr.dtype == slots.dtype == torch.int32
    assert indptr.tolist() == [0, 3, 4, 9] and slots.tolist() == [2, -1, 7]
