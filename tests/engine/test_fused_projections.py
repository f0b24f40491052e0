"""The checkpoint's q_proj/k_proj/v_proj and gate_proj/up_proj load into the rows of one fused weight (and
bias) each, in that order, and every other tensor loads as itself."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from data_plane.model.loader import load_model

from .conftest import greedy, make_engine, run_to_completion


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_qwen2"])
def test_fused_projections_hold_the_checkpoint_tensors_in_order(which, request):
    tiny = request.getfixturevalue(which)
    model, config = load_model(tiny.model_dir, torch.float32, torch.device("cpu"), max_positions=64)
    checkpoint = load_file(tiny.model_dir / "model.safetensors")
    for layer in range(config.spec.num_layers):
        prefix = f"model.layers.{layer}"
        attn, mlp = model.model.layers[layer].self_attn, model.model.layers[layer].mlp
        qkv = [checkpoint[f"{prefix}.self_attn.{name}.weight"] for name in ("q_proj", "k_proj", "v_proj")]
        assert torch.equal(attn.qkv_proj.weight, torch.cat(qkv))
        if config.qkv_bias:
            biases = [
                checkpoint[f"{prefix}.self_attn.{name}.bias"] for name in ("q_proj", "k_proj", "v_proj")
            ]
            assert torch.equal(attn.qkv_proj.bias, torch.cat(biases))
        else:
            assert attn.qkv_proj.bias is None
        gate_up = [checkpoint[f"{prefix}.mlp.{name}.weight"] for name in ("gate_proj", "up_proj")]
        assert torch.equal(mlp.gate_up_proj.weight, torch.cat(gate_up))
        assert torch.equal(attn.o_proj.weight, checkpoint[f"{prefix}.self_attn.o_proj.weight"])
        assert torch.equal(mlp.down_proj.weight, checkpoint[f"{prefix}.mlp.down_proj.weight"])
    assert set(model.checkpoint_tensors()) >= set(checkpoint) - {"lm_head.weight"}


@pytest.mark.parametrize("name", ["r4_qv", "r16_rslora"])
def test_a_step_whose_adapters_leave_slices_alone_still_matches_peft(name, tiny_qwen2):
    # Only this adapter (and the base model) in the batch: the slices and projections it does not target
    # are left out of the step's SGMV.
    from .test_lora_parity import _assert_match, _expected, _prompts

    prompts = _prompts(tiny_qwen2.vocab_size, 5, [7, 1, 19, 4])
    cases = {f"r{i}": (prompt, name if i % 2 == 0 else None) for i, prompt in enumerate(prompts)}
    engine = make_engine(tiny_qwen2)
    for request_id, (prompt, adapter) in cases.items():
        engine.add_request(greedy(request_id, prompt, [tiny_qwen2.ref(adapter)] if adapter else ()))
    _assert_match(run_to_completion(engine), _expected(tiny_qwen2, cases))
