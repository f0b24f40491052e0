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
