"""A tiny Llama checkpoint and PEFT adapters (the engine tests' builder), built once per session; the
worker tests' support module (redis-server children on ports picked free) as `worker_test_support`."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.engine.conftest import TinyModel, _build

_support_path = Path(__file__).parent.parent / "worker" / "support.py"
if "worker_test_support" in sys.modules:
    support = sys.modules["worker_test_support"]
else:
    _spec = importlib.util.spec_from_file_location("worker_test_support", _support_path)
    support = importlib.util.module_from_spec(_spec)
    sys.modules["worker_test_support"] = support
    _spec.loader.exec_module(support)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> TinyModel:
    return _build(tmp_path_factory.mktemp("tiers"), "llama")
