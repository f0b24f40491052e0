"""`dtype="auto"` serves a model in the precision its checkpoint was saved in where the device computes
it: float32 on the CPU; on CUDA a float16 checkpoint in float16 (bfloat16 would round three bits off every
weight), a bfloat16 or float32 one in bfloat16. An explicit dtype always wins."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data_plane.engine.config import EngineConfig

from .conftest import make_engine


@pytest.mark.parametrize(
    ("device", "checkpoint", "want"),
    [
        ("cpu", "float16", torch.float32),
        ("cpu", "bfloat16", torch.float32),
        ("cuda", "float16", torch.float16),
        ("cuda:1", "float16", torch.float16),
        ("cuda", "bfloat16", torch.bfloat16),
        ("cuda", "float32", torch.bfloat16),
    ],
)
def test_auto_follows_the_checkpoint_where_the_device_computes_it(device, checkpoint, want):
    assert EngineConfig(model_dir=Path("m"), device=device).resolve_dtype(checkpoint) == want


def test_an_explicit_dtype_wins_over_the_checkpoint():
    config = EngineConfig(model_dir=Path("m"), device="cuda", dtype="float32")
    assert config.resolve_dtype("float16") == torch.float32


def test_the_engine_reads_the_checkpoint_dtype_from_the_model_config(tiny_llama):
    engine = make_engine(tiny_llama, dtype="auto")
    assert engine.runner.model.model.embed_tokens.weight.dtype == torch.float32  # CPU: float32 always
