"""An adapter directory the engine cannot read is refused naming the file that could not be read."""

from __future__ import annotations

import shutil
import uuid

import pytest

from data_plane.engine.errors import AdapterLoadError
from data_plane.engine.request import AdapterRef
from data_plane.engine.validation import _validate_adapters
from openlora.artifact import CONFIG_FILE, WEIGHTS_FILE


def _copy(tiny_llama, tmp_path):
    path = tmp_path / "adapter"
    shutil.copytree(tiny_llama.adapter_dirs["r8_all"], path)
    return path


def test_weights_saved_as_a_pickle_are_refused_naming_the_missing_safetensors_file(tiny_llama, tmp_path):
    """PEFT's `safe_serialization=False` writes adapter_model.bin beside a valid adapter_config.json; the
    refusal named the config ("adapter_config.json: cannot be read: No such file or directory")."""
    path = _copy(tiny_llama, tmp_path)
    (path / WEIGHTS_FILE).rename(path / "adapter_model.bin")
    with pytest.raises(AdapterLoadError) as refused:
        _validate_adapters((AdapterRef(uuid.uuid4().hex, path),), max_lora_rank=64)
    assert refused.value.field == f"adapter.{WEIGHTS_FILE}"
    assert "No such file" in refused.value.reason


def test_a_missing_config_is_refused_naming_the_config(tiny_llama, tmp_path):
    path = _copy(tiny_llama, tmp_path)
    (path / CONFIG_FILE).unlink()
    with pytest.raises(AdapterLoadError) as refused:
        _validate_adapters((AdapterRef(uuid.uuid4().hex, path),), max_lora_rank=64)
    assert refused.value.field == "adapter"
    assert CONFIG_FILE in refused.value.reason
