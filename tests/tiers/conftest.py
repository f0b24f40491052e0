"""A tiny Llama checkpoint and PEFT adapters (the engine tests' builder), built once per session."""

from __future__ import annotations

import pytest

from tests.engine.conftest import TinyModel, _build


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> TinyModel:
    return _build(tmp_path_factory.mktemp("tiers"), "llama")
