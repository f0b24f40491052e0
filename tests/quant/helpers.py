"""Running a (quantized) model directly through ModelRunner, and its dequantized twin in transformers."""

from __future__ import annotations

from pathlib import Path

import torch

from data_plane.adapters.peft_reader import read_peft_adapter
from data_plane.engine.model_runner import ModelRunner
from data_plane.engine.sequence import Sequence
from data_plane.model.llama import LlamaForCausalLM
from data_plane.model.loader import load_model
from data_plane.model.quant import QuantLinear, QuantSettings

MAX_RANK = 64
BLOCK_SIZE = 16


def quantized_runner(model_dir: Path, quant: QuantSettings, adapter_dirs: list[Path] = ()) -> ModelRunner:
    """A ModelRunner over the model held in `quant`, with adapter i loaded in slot i."""
    model, config = load_model(model_dir, torch.float32, torch.device("cpu"), max_positions=512, quant=quant)
    runner = ModelRunner(
        model, num_kv_blocks=64, block_size=BLOCK_SIZE, num_adapter_slots=4, max_lora_rank=MAX_RANK
    )
    for slot, path in enumerate(adapter_dirs):
        runner.load_adapter(slot, read_peft_adapter(path, config.spec, MAX_RANK, torch.float32))
    return runner


def last_logits(runner: ModelRunner, prompt: list[int], slot: int) -> torch.Tensor:
    """(vocab,) float32 logits after `prompt` through adapter `slot` (-1: none), one prefill."""
    num_blocks = (len(prompt) + BLOCK_SIZE - 1) // BLOCK_SIZE
    seq = Sequence("probe", list(prompt), len(prompt), block_ids=list(range(num_blocks)))
    _, logits = runner.run([seq], [len(prompt)], [slot])
    return logits[0]


def dequantized_weights(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """Checkpoint name -> the weight each QuantLinear computes with, (out, in) float32."""
    return {name: quant.dequantize() for name, quant in model.quantized_weights().items()}


def hf_with_weights(model_dir: Path, weights: dict[str, torch.Tensor]):
    """transformers' model of `model_dir` in float32 with `weights` replacing the checkpoint's."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    params = dict(hf.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            if name == "lm_head.weight" and name not in params:
                # Tied embeddings: a quantized lm_head unties them (the embedding stays full precision).
                hf.lm_head.weight = torch.nn.Parameter(value.clone(), requires_grad=False)
            else:
                params[name].copy_(value)
    return hf.eval()


def write_llama(out_dir: Path, intermediate_size: int) -> Path:
    """A random two-layer Llama (hidden 64) with the given MLP width, saved by transformers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=512,
        architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def quant_modules(model: LlamaForCausalLM) -> list[QuantLinear]:
    return list(model.quantized_weights().values())
