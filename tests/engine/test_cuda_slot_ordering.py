"""CUDA: adapter loads into a slot are ordered against forwards on the compute stream (GPU only).

Regression: a load copied into a slot on the side stream with no event or wait, while a forward launched
earlier could still read the adapter it overwrote; and the next forward was not ordered after the copy.
Run by benchmarks/gpu_check.sh (`-m gpu`); deselected elsewhere (pyproject addopts) and skipped without
a CUDA device.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from data_plane.adapters.host_buffer import pack
from data_plane.adapters.peft_reader import read_peft_adapter
from data_plane.engine.config import EngineConfig
from data_plane.engine.llm_engine import LLMEngine
from data_plane.engine.sequence import Sequence

from .conftest import greedy, make_engine, run_to_completion

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

RANK = 16
BLOCK = 16
NUM_TOKENS = 4096  # one long prefill: a forward that runs for milliseconds on the device


def _write_model(root: Path) -> tuple[Path, list[Path]]:
    """A Llama large enough for a long forward (random weights) and two PEFT adapters on every projection."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=1024,
        max_position_embeddings=NUM_TOKENS + 64,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    model_dir = root / "model"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapters = []
    for index in range(2):
        torch.manual_seed(10 + index)
        lora = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=targets, init_lora_weights=False)
        peft_model = get_peft_model(LlamaForCausalLM(config), lora)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.2)
        path = root / f"adapter{index}"
        peft_model.save_pretrained(path)
        adapters.append(path)
    return model_dir, adapters


def test_slot_overwritten_by_a_load_while_a_forward_reads_it_keeps_that_forward_exact(tmp_path):
    model_dir, adapter_dirs = _write_model(tmp_path)
    engine = LLMEngine(
        EngineConfig(
            model_dir=model_dir,
            device="cuda",
            dtype="float32",
            num_adapter_slots=1,
            max_lora_rank=RANK,
            num_kv_blocks=NUM_TOKENS // BLOCK + 4,
            block_size=BLOCK,
            max_num_batched_tokens=NUM_TOKENS,
            host_cache_bytes=0,
        )
    )
    try:
        runner, spec = engine.runner, engine.spec
        first, second = (
            pack(read_peft_adapter(path, spec, RANK, torch.float32), pin_memory=True) for path in adapter_dirs
        )
        prompt = [int(t) for t in torch.randint(0, spec.vocab_size, (NUM_TOKENS,))]

        def forward() -> torch.Tensor:
            seq = Sequence("s", list(prompt), NUM_TOKENS)
            seq.block_ids = list(range(NUM_TOKENS // BLOCK))
            _, logits = runner.run([seq], [NUM_TOKENS], [0])
            return logits

        runner.install_from_host(0, first)
        want_first = forward().clone()
        runner.install_from_host(0, second)
        want_second = forward().clone()
        torch.cuda.synchronize()
        assert not torch.allclose(want_first, want_second)  # the adapters differ visibly
        for _ in range(20):
            runner.install_from_host(0, first)
            logits = forward()  # launched, still running on the device
            loader = threading.Thread(target=runner.install_from_host, args=(0, second))  # as the loader does
            loader.start()
            loader.join()
            torch.cuda.synchronize()
            torch.testing.assert_close(logits, want_first, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(forward(), want_second, rtol=1e-4, atol=1e-4)  # reads the new load
    finally:
        engine.shutdown()


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_qwen3"])  # Qwen3: q/k norms, head_dim 32 of hidden 64
def test_engine_reusing_one_slot_across_adapters_matches_each_request_run_alone(which, request):
    tiny_llama = request.getfixturevalue(which)
    names = ["r4_qv", "r8_all", "r16_rslora", "r64_all"]
    requests = [
        greedy(f"r{i}", [1 + i % 7, 2, 3 + i % 5], [tiny_llama.ref(names[i % len(names)])], max_tokens=8)
        for i in range(32)
    ]
    alone = {}
    for request in requests:
        engine = make_engine(tiny_llama, device="cuda", num_adapter_slots=4)
        try:
            engine.add_request(request)
            alone[request.request_id] = run_to_completion(engine)[request.request_id][0]
        finally:
            engine.shutdown()
    engine = make_engine(tiny_llama, device="cuda", num_adapter_slots=1, host_cache_bytes=64 << 20)
    try:
        for request in requests:
            engine.add_request(request)
        together = run_to_completion(engine)
    finally:
        engine.shutdown()
    assert {key: tokens for key, (tokens, _) in together.items()} == alone
