"""The engine tests' tiny Llama (llama3 rope) and Qwen2 (q/k/v bias, tied embeddings) checkpoints with
their PEFT adapters, built once per session for the quantization tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine.conftest import TinyModel, _build


@pytest.fixture(scope="session")
def tiny_llama_q(tmp_path_factory) -> TinyModel:
    return _build(tmp_path_factory.mktemp("tiny-q"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_q(tmp_path_factory) -> TinyModel:
    return _build(tmp_path_factory.mktemp("tiny-q"), "qwen2")


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory) -> Path:
    """The trained demo model and its three adapters (the same files `openlora up` serves)."""
    from data_plane.demo import write_demo_model

    out = tmp_path_factory.mktemp("demo-quant")
    write_demo_model(out)
    return out
