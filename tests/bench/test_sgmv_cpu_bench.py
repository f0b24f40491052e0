"""The SGMV CPU benchmark's whole-model-from-memory part on a tiny shape: it times the native kernels (over
float32 slots and float16 ones) and a sum over the very pools it built, counts their bytes, and checks the
kernels' sums against the reference's."""

from __future__ import annotations

import pytest

from benchmarks.fixtures import ModelShape
from benchmarks.sgmv_cpu_bench import _from_memory
from data_plane.model.quant.native import native_kernels, native_kernels_problem

TINY = ModelShape("bench-tiny", 64, 2, 96, 4, 4, 512)


@pytest.mark.parametrize("rows_per_slot", [1, 3])
def test_from_memory_counts_every_factor_and_matches_the_reference(rows_per_slot):
    assert native_kernels() is not None, native_kernels_problem()  # the test machine has a C compiler
    figures = _from_memory(rows_per_slot, passes=3, shape=TINY, num_slots=4, rank=2)
    # per layer: q|k|v (A 3 x 2 rows of 64, B 3 x 64 outputs), o, gate|up (A 2 x 2 x 64, B 2 x 96), down
    per_slot_layer = 2 * ((3 * 64 + 3 * 64) + (64 + 64) + (2 * 64 + 2 * 96) + (96 + 64))
    assert figures["factor_bytes"] == 4 * 4 * TINY.num_layers * per_slot_layer
    assert figures["layout"] == f"8 projections, 4 slots r2, {rows_per_slot} row(s) each"
    assert figures["native_ms"] > 0 and figures["sum_ms"] > 0
    assert figures["max_difference_from_reference"] < 1e-4
    # the same adapters in float16 slots: half the bytes, the float32 slots' sums bit for bit
    assert figures["factor_bytes_float16"] * 2 == figures["factor_bytes"]
    assert figures["native_f16_ms"] > 0 and figures["float16_slots_equal_float32_slots"] is True
