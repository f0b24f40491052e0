"""The full-precision linears' matmul: oneDNN's on float32 CPU models, F.linear under reference and in
other dtypes, and F.linear whenever oneDNN disagrees with it."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from data_plane.model import dense
from data_plane.model.dense import DenseLinear, dense_matmul, onednn_linear
from data_plane.model.loader import load_model
from data_plane.model.lora_linear import LoRALinear


def test_float32_cpu_models_take_onednn_and_everything_else_f_linear():
    cpu = torch.device("cpu")
    assert dense_matmul(cpu, torch.float32, reference=False) == (onednn_linear, dense.ONEDNN)
    assert dense_matmul(cpu, torch.float32, reference=True) == (F.linear, dense.TORCH)
    assert dense_matmul(cpu, torch.bfloat16, reference=False) == (F.linear, dense.TORCH)
    assert dense_matmul(cpu, torch.float16, reference=False) == (F.linear, dense.TORCH)


@pytest.mark.parametrize(
    ("rows", "in_features", "out_features"),
    [(0, 64, 32), (1, 512, 1536), (7, 1376, 512), (92, 512, 2752), (128, 512, 32000), (300, 96, 80)],
)
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_agrees_with_f_linear_within_float32_rounding(rows, in_features, out_features, bias):
    g = torch.Generator().manual_seed(rows + in_features)
    x = torch.randn(rows, in_features, generator=g)
    w = torch.randn(out_features, in_features, generator=g) * in_features**-0.5
    b = torch.randn(out_features, generator=g) if bias else None
    got, want = onednn_linear(x, w, b), F.linear(x, w, b)
    assert got.shape == want.shape == (rows, out_features) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_disagreeing_onednn_is_not_used(monkeypatch, caplog):
    """A build whose op computes something else (or is missing) keeps F.linear, and says why."""
    monkeypatch.setattr(dense, "onednn_linear", lambda x, w, b=None: F.linear(x, w, b) * 1.01)
    dense.onednn_problem.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="data_plane.model.dense"):
            assert dense_matmul(torch.device("cpu"), torch.float32, reference=False) == (
                F.linear,
                dense.TORCH,
            )
        assert "differs from F.linear" in caplog.text
    finally:
        dense.onednn_problem.cache_clear()

    def missing(*args):
        raise AttributeError("'_OpNamespace' 'mkldnn' object has no attribute '_linear_pointwise'")

    monkeypatch.setattr(dense, "onednn_linear", missing)
    try:
        assert dense_matmul(torch.device("cpu"), torch.float32, reference=False) == (F.linear, dense.TORCH)
        assert "AttributeError" in dense.onednn_problem()
    finally:
        dense.onednn_problem.cache_clear()


@pytest.mark.parametrize("choice", ["auto", "reference"])
def test_a_loaded_model_computes_every_full_precision_linear_with_the_choice(choice, tiny_llama, monkeypatch):
    monkeypatch.setenv("OPENLORA_KERNELS", choice)
    model, _ = load_model(tiny_llama.model_dir, torch.float32, torch.device("cpu"), max_positions=64)
    linears = [m for m in model.modules() if isinstance(m, (LoRALinear, DenseLinear))]
    assert isinstance(model.lm_head, DenseLinear) and len(linears) == 4 * len(model.model.layers) + 1
    want = onednn_linear if choice == "auto" else F.linear
    assert all(m.dense_matmul is want for m in linears)
    x = torch.randn(5, model.config.spec.hidden_size)
    torch.testing.assert_close(
        model.compute_logits(x), F.linear(x, model.lm_head.weight), rtol=1e-5, atol=1e-5
    )


def test_the_first_check_runs_on_the_cpu_even_while_a_model_is_built_on_the_meta_device():
    dense.onednn_problem.cache_clear()
    try:
        with torch.device("meta"):
            assert dense_matmul(torch.device("cpu"), torch.float32, reference=False)[1] == dense.ONEDNN
        assert dense.onednn_problem() is None
    finally:
        dense.onednn_problem.cache_clear()
