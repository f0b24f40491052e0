"""The engine tests' tiny Llama (llama3 rope) and Qwen2 (q/k/v bias, tied embeddings) checkpoints with
their PEFT adapters, built once per session for the quantization tests."""

from __future__ import annotations

import pytest

from tests.engine.conftest import TinyModel, _build


@pytest.fixture(scope="session")
def tiny_llama_q(tmp_path_factory) -> TinyModel:
    return _build(tmp_path_factory.mktemp("tiny-q"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_q(tmp_path_factory) -> TinyModel:
    return _build(tmp_path_factory.mktemp("tiny-q"), "qwen2")


@pytest.fixture
def int8_fp32_path(monkeypatch):
    """`choose(two_digit, native=False)`: sets which path int8 layers loaded after it take for float32 CPU
    activations in this test, whatever this machine's measurement chose: the two-digit path, or
    `_weight_int8pack_mm` in bfloat16; with `native`, rows up to int8.NATIVE_MM_MAX_TOKENS take the native
    float32 kernel first (the default where it builds), else none do."""
    from data_plane.model.quant import int8, native

    def choose(two_digit: bool, native_rows: bool = False) -> None:
        monkeypatch.setattr(int8, "two_digit_path_chosen", lambda: two_digit)
        if native_rows:
            assert native.native_kernels() is not None, native.native_kernels_problem()
        monkeypatch.setattr(int8, "native_kernels", native.native_kernels if native_rows else lambda: None)

    return choose


@pytest.fixture
def int4_kernel(monkeypatch):
    """`choose(name)`: int4 layers built after it on the CPU take `name`'s kernel in this test: "native"
    (int4_cpu.c, float32; this machine must be able to build it) or "tinygemm" (PyTorch's bfloat16 kernel,
    what serves where the library cannot be built)."""
    from data_plane.model.quant import int4, native

    def choose(name: str) -> None:
        if name == "native":
            assert native.native_kernels() is not None, native.native_kernels_problem()
            monkeypatch.setattr(int4, "native_kernels", native.native_kernels)
        else:
            monkeypatch.setattr(int4, "native_kernels", lambda: None)

    return choose
