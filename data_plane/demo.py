"""write_demo_model: a small deterministic Llama checkpoint, its BPE tokenizer and three PEFT adapters.

Everything is made here from a built-in text in well under a minute on two CPU cores, so the whole
system runs with no download. The base model is trained briefly on the text; each adapter is then
trained briefly on its own toy task, so the same prompt reads differently through each:

    uppercase  "the quick fox =>" -> " THE QUICK FOX"
    reverse    "the quick fox =>" -> " fox quick the"
    count      "the quick fox =>" -> " 1 2 3 4 5 6 7 8"
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SEED = 1234
_TEXT = """\
the quick brown fox jumps over the lazy dog. a small model serves many adapters at once.
one base model stays resident and every request may name its own adapter.
adapters are loaded just in time and batched together in every forward pass.
the cost of the next adapter is close to zero because only its low rank factors move.
rare adapters should still be warm when their requests arrive, so the system predicts them.
caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber \u65e5\u672c\u8a9e \U0001f642 multi byte text decodes cleanly.
"""
_SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]
_EOS_ID = 2
TASKS = ("uppercase", "reverse", "count")
_BASE_STEPS = 80
_ADAPTER_STEPS = 200


def _words() -> list[str]:
    return [w.strip(".,") for w in _TEXT.split() if w.strip(".,").isascii() and w.strip(".,").isalpha()]


def _task_line(task: str, rng: random.Random) -> tuple[str, str]:
    """(prompt, answer) of one example of `task`."""
    words = _words()
    phrase = [rng.choice(words) for _ in range(rng.randint(2, 5))]
    if task == "uppercase":
        answer = " ".join(phrase).upper()
    elif task == "reverse":
        answer = " ".join(reversed(phrase))
    else:
        answer = " ".join(str(i) for i in range(1, 9))
    return f"{' '.join(phrase)} =>", f" {answer}"


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=640,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    rng = random.Random(SEED)
    corpus = _TEXT.splitlines() + ["".join(_task_line(t, rng)) for t in TASKS for _ in range(50)]
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


def _batches(tokenizer, examples: list[tuple[str, str]], batch_size: int, rng: random.Random):
    """Endless (ids, labels) batches; the loss covers the answer (and EOS) only, not the prompt."""
    while True:
        rows = []
        for prompt, answer in (rng.choice(examples) for _ in range(batch_size)):
            prompt_ids = tokenizer.encode(prompt).ids
            rows.append((prompt_ids, [*tokenizer.encode(answer).ids, _EOS_ID]))
        width = max(len(p) + len(a) for p, a in rows)
        ids = torch.full((batch_size, width), _EOS_ID, dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        for i, (prompt_ids, answer_ids) in enumerate(rows):
            ids[i, : len(prompt_ids) + len(answer_ids)] = torch.tensor(prompt_ids + answer_ids)
            labels[i, len(prompt_ids) : len(prompt_ids) + len(answer_ids)] = torch.tensor(answer_ids)
        yield ids, labels


def _train(model, parameters, batches, steps: int, lr: float) -> float:
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        ids, labels = next(batches)
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return float(loss.detach())


def write_demo_model(
    out_dir: Path, *, base_steps: int = _BASE_STEPS, adapter_steps: int = _ADAPTER_STEPS
) -> None:
    """Writes config.json, model.safetensors, tokenizer.json and adapters/<task>/ (PEFT) under out_dir.

    The step counts exist for tests that need the files but not well-trained adapters.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    tokenizer = _train_tokenizer()
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=_EOS_ID,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    text = [("", line) for line in _TEXT.splitlines()]
    loss = _train(model, model.parameters(), _batches(tokenizer, text, 16, rng), base_steps, 3e-3)
    log.info("demo base model trained: loss %.2f", loss)
    model.save_pretrained(out_dir)
    (out_dir / "openlora_demo.json").write_text(json.dumps({"tasks": list(TASKS), "seed": SEED}, indent=2))

    for task in TASKS:
        base = LlamaForCausalLM.from_pretrained(out_dir)
        lora = LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            lora_dropout=0.0,
        )
        peft_model = get_peft_model(base, lora)
        examples = [_task_line(task, rng) for _ in range(200)]
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        loss = _train(peft_model, trainable, _batches(tokenizer, examples, 16, rng), adapter_steps, 5e-3)
        log.info("demo adapter %s trained: loss %.2f", task, loss)
        adapter_dir = out_dir / "adapters" / task
        peft_model.save_pretrained(adapter_dir)
        readme = adapter_dir / "README.md"
        if readme.exists():
            readme.unlink()
