"""What a quantized load holds: every decoder linear in the format, the rest in the model dtype; which
kernels its linears run; a broken checkpoint stops the load with an error naming the shard or tensor, and
a linear the format cannot pack stops it before anything is read (nothing half-loaded)."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from data_plane.model import loader
from data_plane.model.dense import DenseLinear
from data_plane.model.loader import CheckpointError, load_model
from data_plane.model.lora_linear import LoRALinear
from data_plane.model.quant import QuantizationError, QuantLinear, QuantSettings
from data_plane.model.quant.lora import QuantLoRALinear

from .helpers import quant_modules, write_llama


def _load(model_dir, quant: QuantSettings):
    return load_model(model_dir, torch.float32, torch.device("cpu"), max_positions=64, quant=quant)[0]


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_every_decoder_linear_is_quantized_and_the_rest_keeps_the_model_dtype(tiny_llama_q, fmt):
    model = _load(tiny_llama_q.model_dir, QuantSettings(fmt))
    for layer in range(len(model.model.layers)):
        for name, (proj, index) in model.lora_targets(layer).items():
            assert isinstance(proj, QuantLoRALinear) and proj.quants[index].format == fmt, name
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert model.model.norm.weight.dtype == torch.float32
    assert isinstance(model.lm_head, DenseLinear) and model.lm_head.weight.dtype == torch.float32
    weights = model.weight_bytes()
    assert weights.decoder_bits_per_weight < (9 if fmt == "int8" else 5)


def test_lm_head_is_quantized_only_when_asked(tiny_llama_q):
    model = _load(tiny_llama_q.model_dir, QuantSettings("int8", lm_head=True))
    assert isinstance(model.lm_head, QuantLinear)
    full = _load(tiny_llama_q.model_dir, QuantSettings())
    assert isinstance(full.projections(0)["qkv_proj"], LoRALinear)
    assert not isinstance(full.projections(0)["qkv_proj"], QuantLoRALinear)
    assert full.weight_bytes().decoder_bits_per_weight == 32


def test_a_truncated_shard_stops_a_quantized_load_naming_it(tiny_llama_q, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llama_q.model_dir, model_dir)
    shard = model_dir / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        _load(model_dir, QuantSettings("int4"))


def test_a_linear_of_the_wrong_shape_stops_a_quantized_load_naming_it(tiny_llama_q, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llama_q.model_dir, model_dir)
    tensors = load_file(model_dir / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"down_proj\.weight.*expected"):
        _load(model_dir, QuantSettings("int4"))


def test_int4_refuses_a_model_whose_mlp_width_it_cannot_group_before_reading_a_tensor(tmp_path, monkeypatch):
    model_dir = write_llama(tmp_path / "model", intermediate_size=344)  # 344 = 8 x 43: no group of 32
    reads = []
    real_iter_tensors = loader.iter_tensors
    monkeypatch.setattr(loader, "iter_tensors", lambda path: reads.append(path) or real_iter_tensors(path))
    with pytest.raises(QuantizationError) as refused:
        _load(model_dir, QuantSettings("int4"))
    message = str(refused.value)
    assert "down_proj" in message and "in_features 344" in message
    assert "multiple of 32" in message and "use --quantize int8 or none" in message
    assert reads == []
    model = _load(model_dir, QuantSettings("int8"))  # the checkpoint itself is sound: int8 packs it
    assert reads and all(q.format == "int8" for q in quant_modules(model))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_the_kernel_switch_is_read_once_when_the_model_loads(tiny_llama_q, fmt, monkeypatch):
    monkeypatch.setenv("OPENLORA_KERNELS", "reference")
    reference = _load(tiny_llama_q.model_dir, QuantSettings(fmt, lm_head=True))
    monkeypatch.setenv("OPENLORA_KERNELS", "auto")
    packed = _load(tiny_llama_q.model_dir, QuantSettings(fmt, lm_head=True))
    monkeypatch.setenv("OPENLORA_KERNELS", "reference")  # after loading: changes nothing
    assert all(q.use_reference for q in quant_modules(reference))
    assert not any(q.use_reference for q in quant_modules(packed))
    x = torch.randn(3, packed.config.spec.hidden_size)
    head = packed.lm_head
    assert torch.equal(head(x), head.kernel(x))
