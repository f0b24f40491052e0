"""Slots of the CPU's SGMV pools that hold float16 or bfloat16 factors (an adapter whose file is 16-bit,
kept in its own format: half the bytes a decode step reads). The kernels widen each element as they load
it, so every 16-bit value must come out as the float32 it is, on the vector loads and the scalar tails,
through the CPU's conversion and through the bit arithmetic a CPU without one takes; and a step over slots
of mixed formats must give, bit for bit, what the same step gives over the widened float32 pools."""

from __future__ import annotations

import itertools
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_plane.model.native_lora import MAX_NATIVE_SEGMENT_ROWS, NativeLora
from data_plane.model.quant.native import (
    SLOT_FORMATS,
    NativeSegments,
    native_kernels,
    native_kernels_problem,
    packed_view,
)

HALVES = (torch.float16, torch.bfloat16)
ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def cpu_kernels():
    kernels = native_kernels()
    assert kernels is not None, native_kernels_problem()  # the test machine has a C compiler
    return kernels


def _every_value(dtype: torch.dtype) -> torch.Tensor:
    """All 65,536 bit patterns of `dtype`: zeros, subnormals, normals, infinities and NaNs."""
    return torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)


def _assert_same_floats(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", HALVES, ids=["float16", "bfloat16"])
def test_every_16_bit_value_is_read_as_the_float32_it_is(cpu_kernels, dtype):
    values = _every_value(dtype)
    count = values.numel()
    # Shrink: row c of a 16-bit slot holds value c at column c % K, zeros elsewhere; x is ones, so u[0, c]
    # is the value widened (plus exact zeros). K = 67: columns 0-63 are read by vector loads at any vector
    # width up to 16, columns 64-66 by the scalar tail.
    k = 67
    a = torch.zeros(count, k, dtype=dtype)
    a[torch.arange(count), torch.arange(count) % k] = values
    pool = torch.zeros(2, count, k)
    packed_view(pool, dtype)[1] = a
    segments = NativeSegments([(0, 1, 1, count)], 1, 2, [SLOT_FORMATS[dtype]])
    u = cpu_kernels.sgmv_shrink(torch.ones(1, k), pool, segments)
    _assert_same_floats(u[0], values.float())
    # Expand: B's one column holds every value (outputs contiguous, 3 past a whole number of vectors: the
    # tail too), u = 1 and scale 1, so y is the values widened.
    out = count + 3
    b_pool = torch.zeros(2, 1, out).transpose(1, 2)  # (S, O, 1), the CPU pools' layout
    column = torch.zeros(out, dtype=dtype)
    column[:count] = values
    packed_view(b_pool, dtype)[1, :, 0] = column
    y = torch.zeros(1, out)
    cpu_kernels.sgmv_expand(torch.ones(1, 1), b_pool, torch.ones(2), segments, y)
    _assert_same_floats(y[0], column.float())
    # B with its ranks contiguous (S, O, R): the path that transposes tiles onto the stack.
    b_rows = torch.zeros(2, out, 2)
    packed_view(b_rows, dtype)[1, :, 0] = column
    y = torch.zeros(1, out)
    cpu_kernels.sgmv_expand(torch.ones(1, 2), b_rows, torch.ones(2), segments, y)
    _assert_same_floats(y[0], column.float())


def test_the_bit_arithmetic_for_cpus_without_a_half_conversion(tmp_path):
    """The library built without F16C and AVX-512 (x86; elsewhere the build has neither anyway) takes
    `HALF_BITS` for every float16 load: the test above, against that build."""
    flags = " -mno-f16c -mno-avx512f" if platform.machine().lower() in ("x86_64", "amd64", "i686") else ""
    env = {
        **os.environ,
        "CC": (os.environ.get("CC") or "cc") + flags,
        "XDG_CACHE_HOME": str(tmp_path),
    }
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"{Path(__file__).relative_to(ROOT)}::test_every_16_bit_value_is_read_as_the_float32_it_is",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "2 passed" in run.stdout
    assert list(tmp_path.glob("openlora/kernels/openlora_cpu-*.so"))  # that build, not another's


LAYOUTS = {
    # (segment lengths, slots): every work item a whole segment; a few segments shared out by columns; a
    # prompt chunk that goes to torch's matmuls among decode rows
    "decode, one row per slot": ([1] * 24, [i % 12 for i in range(24)]),
    "a few segments": ([3, 1, 6], [4, 1, 10]),
    "prompt chunk among decodes": ([MAX_NATIVE_SEGMENT_ROWS + 7, 1, 3, 1], [1, 0, 5, 2]),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("outs", [(24,), (24, 8, 8), (150, 77)], ids=["one slice", "q|k|v", "wide"])
def test_a_step_over_slots_of_mixed_formats_gives_the_widened_pools_floats(cpu_kernels, layout, outs):
    gen = torch.Generator().manual_seed(len(outs))
    lengths, slots = LAYOUTS[layout]
    bounds = [0, *itertools.accumulate(lengths)]
    num_slots, max_rank, h_in, n = 12, 8, 43, len(outs)
    ranks = [8, 2, 4, 8, 1, 4, 3, 8, 5, 6, 7, 2]
    formats = [(torch.float32, torch.float16, torch.bfloat16)[s % 3] for s in range(num_slots)]
    x = torch.randn(bounds[-1], h_in, generator=gen)
    wide_a = torch.randn(num_slots, max_rank * n, h_in, generator=gen)
    wide_b = [torch.randn(num_slots, max_rank, out, generator=gen).transpose(1, 2) for out in outs]
    # The values each slot's format holds, widened: the float32 pools of the same adapters.
    for slot, dtype in enumerate(formats):
        wide_a[slot] = wide_a[slot].to(dtype).float()
        for b in wide_b:
            b[slot] = b[slot].to(dtype).float()
    packed_a = wide_a.clone()
    packed_b = [b.clone(memory_format=torch.preserve_format) for b in wide_b]
    for slot, dtype in enumerate(formats):
        if dtype != torch.float32:
            packed_view(packed_a, dtype)[slot] = wide_a[slot].to(dtype)
            for packed, b in zip(packed_b, wide_b, strict=True):
                packed_view(packed, dtype)[slot] = b[slot].to(dtype)
    assert not torch.equal(packed_a, wide_a)  # the 16-bit slots' float32 bytes are not the values
    scale = torch.rand(n, num_slots, generator=gen)
    y0 = torch.randn(bounds[-1], sum(outs), generator=gen)
    slice_bounds = [(sum(outs[:i]), sum(outs[: i + 1])) for i in range(n)]
    wide, packed = y0.clone(), y0.clone()
    NativeLora.plan(bounds, slots, ranks, num_slots, cpu_kernels).add(
        x, wide, wide_a, wide_b, scale, range(n), slice_bounds
    )
    plan = NativeLora.plan(bounds, slots, ranks, num_slots, cpu_kernels, formats)
    assert {dtype for *_, dtype in plan.long} <= set(formats)
    plan.add(x, packed, packed_a, packed_b, scale, range(n), slice_bounds)
    assert torch.equal(packed, wide)
    assert not torch.equal(packed, y0)


def test_unknown_formats_and_16_bit_views_of_other_pools_are_refused():
    with pytest.raises(ValueError, match="formats"):
        NativeSegments([(0, 1, 0, 4)], 1, 1, [3])
    with pytest.raises(ValueError, match="formats"):
        NativeSegments([(0, 1, 0, 4)], 1, 1, [0, 1])
    with pytest.raises(ValueError, match="16-bit view"):
        packed_view(torch.zeros(2, 4, 4, dtype=torch.float16), torch.float16)
    with pytest.raises(ValueError, match="16-bit view"):
        packed_view(torch.zeros(2, 4, 4), torch.int16)
