"""Greedy decoding with transformers (+ PEFT) one request at a time: the ground truth."""

from __future__ import annotations

from pathlib import Path

import torch


def load_reference(model_dir: Path, adapter_dirs: list[Path] | None = None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dirs:
        model = PeftModel.from_pretrained(model, adapter_dirs[0], adapter_name="a0")
        for i, path in enumerate(adapter_dirs[1:], start=1):
            model.load_adapter(path, adapter_name=f"a{i}")
    return model.eval()


@torch.no_grad()
def reference_greedy(model, prompt: list[int], max_tokens: int = 16) -> tuple[list[int], list[float]]:
    """Greedy tokens and their logprobs, recomputing the whole sequence at every step."""
    ids = list(prompt)
    tokens, logprobs = [], []
    for _ in range(max_tokens):
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        logp = torch.log_softmax(logits, dim=-1)
        token = int(torch.argmax(logits))
        tokens.append(token)
        logprobs.append(float(logp[token]))
        ids.append(token)
    return tokens, logprobs


def write_peft_adapter(model_dir: Path, out: Path, seed: int, **lora_config) -> Path:
    """A LoRA adapter written by PEFT's `save_pretrained` for the model at `model_dir`, with random A and
    B (B ~ N(0, 0.5), so the adapter changes the greedy tokens); `lora_config` goes to `LoraConfig`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(init_lora_weights=False, **lora_config))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(out)
    return out
