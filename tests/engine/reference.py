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
