"""A tiny Llama checkpoint and PEFT adapters (the engine tests' builder), built once per session; the
worker tests' support module (redis-server children on ports picked free) as `worker_test_support`."""

from __future__ import annotations

import sys

import pytest

from tests.engine.conftest import TinyModel, _build

support = sys.modules["worker_test_support"]  # loaded by tests/conftest.py


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> TinyModel:
    return _build(tmp_path_factory.mktemp("tiers"), "llama")
