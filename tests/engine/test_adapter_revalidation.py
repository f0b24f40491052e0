"""A worker reads the same artifact again whenever it comes back from disk: it is validated in full only
the first time, yet any change to its files (rewritten, replaced, a file added) is validated again, and a
refusal is never remembered."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from data_plane.adapters import peft_reader
from data_plane.engine.errors import AdapterLoadError
from openlora.artifact import CONFIG_FILE, WEIGHTS_FILE
from openlora.base_model import BaseModelSpec


@pytest.fixture
def spec(tiny_llama) -> BaseModelSpec:
    config = json.loads((tiny_llama.model_dir / "config.json").read_text())
    return BaseModelSpec.from_hf_config(config, "tiny")


@pytest.fixture
def adapter(tiny_llama, tmp_path):
    directory = tmp_path / "adapter"
    shutil.copytree(next(iter(tiny_llama.adapter_dirs.values())), directory)
    return directory


@pytest.fixture
def validations(monkeypatch):
    """Counts full validations."""
    calls = []
    real = peft_reader.validate_adapter_dir

    def counting(path, *args, **kwargs):
        calls.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(peft_reader, "validate_adapter_dir", counting)
    return calls


def _read(path, spec):
    return peft_reader.read_peft_adapter(path, spec, 64, torch.float32)


def _same_factors(a, b) -> bool:
    return a.factors.keys() == b.factors.keys() and all(
        torch.equal(a.factors[k].a, b.factors[k].a) and torch.equal(a.factors[k].b, b.factors[k].b)
        for k in a.factors
    )


def test_an_unchanged_artifact_is_validated_once_and_reads_the_same(adapter, spec, validations):
    first = _read(adapter, spec)
    second = _read(adapter, spec)
    assert len(validations) == 1
    assert _same_factors(first, second)


def test_a_replaced_weights_file_is_validated_again_and_its_nan_refused(adapter, spec, validations):
    _read(adapter, spec)
    tensors = load_file(adapter / WEIGHTS_FILE)
    name = next(iter(tensors))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, adapter / "tmp.safetensors")
    os.replace(adapter / "tmp.safetensors", adapter / WEIGHTS_FILE)  # a new file (new inode), same size
    with pytest.raises(AdapterLoadError, match="NaN"):
        _read(adapter, spec)
    assert len(validations) == 2


def test_a_weights_file_rewritten_in_place_is_validated_again(adapter, spec, validations):
    _read(adapter, spec)
    data = (adapter / WEIGHTS_FILE).read_bytes()
    with open(adapter / WEIGHTS_FILE, "r+b") as f:  # same inode: truncated by one byte
        f.truncate(len(data) - 1)
    with pytest.raises(AdapterLoadError):
        _read(adapter, spec)
    assert len(validations) == 2


def test_an_added_file_or_a_changed_config_is_validated_again(adapter, spec, validations):
    _read(adapter, spec)
    (adapter / "extra.bin").write_bytes(b"x")
    with pytest.raises(AdapterLoadError, match=r"extra\.bin"):
        _read(adapter, spec)
    (adapter / "extra.bin").unlink()
    config = json.loads((adapter / CONFIG_FILE).read_text())
    config["r"] = 4096
    (adapter / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(AdapterLoadError, match="rank"):
        _read(adapter, spec)
    assert len(validations) == 3


def test_a_refusal_is_not_remembered(adapter, spec, validations):
    config = (adapter / CONFIG_FILE).read_bytes()
    (adapter / CONFIG_FILE).unlink()
    for _ in range(2):
        with pytest.raises(AdapterLoadError, match=CONFIG_FILE):
            _read(adapter, spec)
    (adapter / CONFIG_FILE).write_bytes(config)
    _read(adapter, spec)
    assert len(validations) == 3


def test_another_base_model_or_rank_limit_is_validated_on_its_own(adapter, spec, validations):
    _read(adapter, spec)
    with pytest.raises(AdapterLoadError):
        peft_reader.read_peft_adapter(adapter, spec, 1, torch.float32)  # rank above this engine's limit
    other = BaseModelSpec(**{**spec.__dict__, "hidden_size": spec.hidden_size * 2})
    with pytest.raises(AdapterLoadError):
        _read(adapter, other)
    assert len(validations) == 3


def test_the_memo_is_bounded_by_tensors_and_keeps_the_most_recent(
    adapter, spec, validations, monkeypatch, tmp_path
):
    """Each entry holds its adapter's tensor list: 530 KiB for an 80-layer one, 4,096 entries of which
    were 2 GiB outside the host tier's budget."""
    peft_reader.forget_validations()
    per_adapter = len(peft_reader.validated_info(adapter, spec, 64).tensors)
    monkeypatch.setattr(peft_reader, "_VALIDATED_MAX_TENSORS", 2 * per_adapter)
    copies = [shutil.copytree(adapter, tmp_path / f"copy{i}") for i in range(3)]
    for copy in copies:
        _read(copy, spec)
    assert peft_reader._validated_tensors <= 2 * per_adapter
    assert len(peft_reader._validated) == 2
    before = len(validations)
    _read(copies[2], spec)  # the most recent: kept
    assert len(validations) == before
    _read(copies[0], spec)  # the oldest: validated again
    assert len(validations) == before + 1
