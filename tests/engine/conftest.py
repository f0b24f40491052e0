"""Tiny Llama, Qwen2 and Qwen3 checkpoints (random fp32 weights) and PEFT adapters for them, built once."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from data_plane.engine.config import EngineConfig
from data_plane.engine.llm_engine import LLMEngine
from data_plane.engine.request import AdapterRef, EngineRequest, SamplingOptions
from openlora.artifact import digest_dir

ALL_SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> (rank, alpha, targets, use_rslora)
ADAPTERS = {
    "r4_qv": (4, 8, ["q_proj", "v_proj"], False),
    "r8_all": (8, 16, ALL_SEVEN, False),
    "r16_rslora": (16, 8, ["k_proj", "o_proj", "gate_proj", "down_proj"], True),
    "r64_all": (64, 32, ALL_SEVEN, False),
}


# The shape of every tiny test model written by transformers here (a test adds its own flags).
TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
)


@dataclass
class TinyModel:
    model_dir: Path
    adapter_dirs: dict[str, Path]
    vocab_size: int

    def ref(self, name: str, weight: float = 1.0) -> AdapterRef:
        path = self.adapter_dirs[name]
        return AdapterRef(key=digest_dir(path), path=path, weight=weight)


def _build(root: Path, architecture: str) -> TinyModel:
    from peft import LoraConfig, get_peft_model
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    common = dict(
        **TINY_SHAPE,
        max_position_embeddings=512,
        initializer_range=0.1,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed({"llama": 0, "qwen2": 1, "qwen3": 2}[architecture])
    if architecture == "llama":
        config = LlamaConfig(
            **common,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            rope_theta=500000.0,
        )
        model_class = LlamaForCausalLM
    elif architecture == "qwen2":
        config = Qwen2Config(**common, tie_word_embeddings=True)
        model_class = Qwen2ForCausalLM
    else:  # heads of 32 over a hidden size of 64 (4 heads): q_proj is 64 -> 128, o_proj 128 -> 64
        config = Qwen3Config(**common, head_dim=32, attention_bias=True)
        model_class = Qwen3ForCausalLM
    model = model_class(config)
    with torch.no_grad():  # biases start at zero and the q/k norms at one: make them count
        for layer in model.model.layers:
            attn = layer.self_attn
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                if proj.bias is not None:
                    proj.bias.normal_(0, 0.1)
            for norm in (getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)):
                if norm is not None:
                    norm.weight.normal_(1, 0.3)
    model_dir = root / architecture
    model.save_pretrained(model_dir)
    adapter_dirs = {}
    for index, (name, (rank, alpha, targets, rslora)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(100 + index)
        base = model_class(config)
        lora = LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, init_lora_weights=False
        )
        peft_model = get_peft_model(base, lora)
        with torch.no_grad():  # scale the random factors so every adapter visibly changes the output
            for param_name, param in peft_model.named_parameters():
                if "lora_B" in param_name:
                    param.normal_(0, 0.5)
        adapter_dirs[name] = root / f"{architecture}_{name}"
        peft_model.save_pretrained(adapter_dirs[name])
    return TinyModel(model_dir, adapter_dirs, config.vocab_size)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> TinyModel:
    return _build(tmp_path_factory.mktemp("tiny"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> TinyModel:
    return _build(tmp_path_factory.mktemp("tiny"), "qwen2")


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> TinyModel:
    return _build(tmp_path_factory.mktemp("tiny"), "qwen3")


def make_engine(model: TinyModel, **overrides) -> LLMEngine:
    return LLMEngine(engine_config(model, **overrides))


def engine_config(model: TinyModel, **overrides) -> EngineConfig:
    """The tests' engine settings for `model`, with `overrides`."""
    settings = dict(
        model_dir=model.model_dir,
        dtype="float32",
        num_kv_blocks=64,
        block_size=16,
        num_adapter_slots=8,
        max_lora_rank=64,
        max_num_seqs=16,
        max_num_batched_tokens=512,
    )
    settings.update(overrides)
    return EngineConfig(**settings)


def block_disk_reads(engine: LLMEngine) -> threading.Event:
    """Disk reads of the engine's loader wait (at most 30 s) until the returned event is set."""
    released = threading.Event()
    read = engine.loader._read

    def blocked_read(members):
        released.wait(30.0)
        return read(members)

    engine.loader._read = blocked_read
    return released


def greedy(request_id: str, prompt: list[int], adapters=(), max_tokens: int = 16) -> EngineRequest:
    return EngineRequest(
        request_id=request_id,
        prompt_token_ids=prompt,
        sampling=SamplingOptions(max_tokens=max_tokens, logprobs=True),
        adapters=tuple(adapters),
    )


def run_to_completion(engine: LLMEngine, max_steps: int = 10_000) -> dict[str, tuple[list[int], list[float]]]:
    """Steps until idle; returns request id -> (generated token ids, their logprobs)."""
    results: dict[str, tuple[list[int], list[float]]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return results
        for out in engine.step():
            tokens, logprobs = results.setdefault(out.request_id, ([], []))
            tokens.extend(out.new_token_ids)
            logprobs.extend(out.new_logprobs or [])
    raise AssertionError("engine did not finish")


def assert_served_like_peft(model: TinyModel, adapter: Path, prompts: dict[str, list[int]]) -> None:
    """Each prompt, greedy on `adapter` in one engine batch, gives transformers + PEFT's tokens and
    logprobs (within 1e-3)."""
    from .reference import load_reference, reference_greedy

    engine = make_engine(model)
    for request_id, prompt in prompts.items():
        engine.add_request(greedy(request_id, prompt, [AdapterRef(key=digest_dir(adapter), path=adapter)]))
    results = run_to_completion(engine)
    reference = load_reference(model.model_dir, [adapter])
    for request_id, prompt in prompts.items():
        want_tokens, want_logprobs = reference_greedy(reference, prompt)
        got_tokens, got_logprobs = results[request_id]
        assert got_tokens == want_tokens, request_id
        assert got_logprobs == pytest.approx(want_logprobs, abs=1e-3), request_id
