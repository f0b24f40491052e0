"""Every path of int4_cpu.c and int8_cpu.c, not only the one -march=native takes here: the library is built
for each instruction set this CPU runs (AVX-512, AVX2, plain C) and its products and dequantization compared
with the torch dequantizations, over group sizes, odd row counts, widths past the last whole vector and
token counts around the tile of 8 rows."""

from __future__ import annotations

import hashlib
import platform
import subprocess

import pytest
import torch

from data_plane.model.quant import int4, int8, native


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.split(":")[0].strip() in ("flags", "Features"):
                return set(line.split(":", 1)[1].split())
    return set()


def _paths() -> list[tuple[str, int]]:
    """(-march, the vector bits it builds) for each path this machine can run."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return [("native", 0)]  # no vector path outside x86: the plain C one is what serves
    flags = _cpu_flags()
    paths = [("x86-64", 0)]
    if {"avx2", "fma"} <= flags:
        paths.append(("x86-64-v3", 256))
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"} <= flags:
        paths.append(("x86-64-v4", 512))
    return paths


@pytest.fixture(scope="module", params=_paths(), ids=lambda path: path[0])
def built(request, tmp_path_factory) -> native.NativeKernels:
    march, bits = request.param
    compiler = native._compiler()
    path = tmp_path_factory.mktemp(f"quant-{march}") / "quant_cpu.so"
    flags = [flag if not flag.startswith("-march=") else f"-march={march}" for flag in native.FLAGS]
    subprocess.run([*compiler, *flags, *map(str, native.SOURCES), "-o", str(path)], check=True, timeout=120)
    native._digest_path(path).write_text(hashlib.sha256(path.read_bytes()).hexdigest() + "\n")
    kernel = native._load_library(compiler, path)  # found whole beside its digest: loaded, not built
    assert kernel.vector_bits == bits
    return kernel


@pytest.mark.parametrize("group_size", [128, 64, 32])
@pytest.mark.parametrize("out_features", [1, 3, 17])
def test_every_path_computes_the_dequantized_product(built, group_size, out_features):
    g = torch.Generator().manual_seed(group_size + out_features)
    q, scale, offset = int4.quantize_int4(torch.randn(out_features, 384, generator=g), group_size)
    codes = int4.pack_native(q, group_size)
    w = int4.dequantize_int4(q, scale, offset)
    assert torch.equal(built.int4_dequantize(built.int4_weight(codes, scale, offset, group_size)), w)
    assert built.int4_mm(torch.randn(0, 384), built.int4_weight(codes, scale, offset, group_size)).shape == (
        0,
        out_features,
    )
    for num_tokens in range(1, 41):
        x = torch.randn(num_tokens, 384, generator=g)
        got = built.int4_mm(x, built.int4_weight(codes, scale, offset, group_size))
        want = x.double() @ w.double().T
        assert (got.double() - want).abs().max() <= 2e-6 * want.abs().max().clamp(min=1), num_tokens


def test_every_path_carries_inf_and_nan_as_a_dense_product_does(built):
    g = torch.Generator().manual_seed(5)
    q, scale, offset = int4.quantize_int4(torch.randn(17, 256, generator=g), 128)
    w = int4.dequantize_int4(q, scale, offset)
    x = torch.randn(11, 256, generator=g)
    x[2, 5], x[9, 200], x[4, 0] = float("inf"), float("nan"), float("-inf")
    got, want = built.int4_mm(x, built.int4_weight(int4.pack_native(q, 128), scale, offset, 128)), x @ w.T
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    finite = want.isfinite()
    assert torch.allclose(got[finite], want[finite], rtol=1e-5, atol=1e-4)


def test_every_path_takes_a_wide_input(built):
    # Llama's MLP widths as in_features: 11008 (7B), 14336 (8B) columns in 86 and 112 groups.
    g = torch.Generator().manual_seed(6)
    for in_features in (11008, 14336):
        q, scale, offset = int4.quantize_int4(torch.randn(5, in_features, generator=g), 128)
        x = torch.randn(9, in_features, generator=g)
        want = x.double() @ int4.dequantize_int4(q, scale, offset).double().T
        got = built.int4_mm(x, built.int4_weight(int4.pack_native(q, 128), scale, offset, 128))
        assert (got.double() - want).abs().max() <= 2e-6 * want.abs().max()


@pytest.mark.parametrize("in_features", [16, 100, 250, 384, 1000])
@pytest.mark.parametrize("out_features", [1, 3, 17])
def test_every_path_computes_the_int8_product(built, in_features, out_features):
    # Widths that end inside a vector (100, 250, 1000) take the scalar tail; rows K_pad apart as int8.py
    # holds them (the padding's codes are never read: filled with a value that would show).
    g = torch.Generator().manual_seed(in_features + out_features)
    q, scale = int8.quantize_int8(torch.randn(out_features, in_features, generator=g))
    k_pad = (in_features + 15) // 16 * 16
    padded = torch.full((out_features, k_pad), 127, dtype=torch.int8)
    padded[:, :in_features] = q
    w = int8.dequantize_int8(q, scale)
    assert built.int8_mm(torch.randn(0, in_features), built.int8_weight(padded, scale)).shape == (
        0,
        out_features,
    )
    for num_tokens in range(1, 21):  # every remainder of the 8-row tile, on one pass and on several
        x = torch.randn(num_tokens, in_features, generator=g)
        got = built.int8_mm(x, built.int8_weight(padded, scale))
        want = x.double() @ w.double().T
        # float32 sums in another order: bounded by the sum of the terms' magnitudes, not by the result
        magnitude = x.double().abs() @ w.double().abs().T
        assert ((got.double() - want).abs() <= 1e-6 * magnitude + 1e-30).all(), num_tokens


def test_every_path_carries_inf_and_nan_through_int8_as_a_dense_product_does(built):
    # In the vector loop (column 0), the scalar tail (column 249) and a row of zero codes (0 * inf is nan).
    g = torch.Generator().manual_seed(7)
    q, scale = int8.quantize_int8(torch.randn(17, 250, generator=g))
    q[3] = 0
    w = int8.dequantize_int8(q, scale)
    x = torch.randn(11, 250, generator=g)
    x[2, 0], x[9, 249], x[4, 100] = float("inf"), float("nan"), float("-inf")
    got, want = built.int8_mm(x, built.int8_weight(torch.nn.functional.pad(q, (0, 6)), scale)), x @ w.T
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    assert torch.equal(got[want.isinf()], want[want.isinf()])
    finite = want.isfinite()
    assert torch.allclose(got[finite], want[finite], rtol=1e-5, atol=1e-4)
