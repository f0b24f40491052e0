"""write_demo_model: a small deterministic Llama checkpoint, its BPE tokenizer and three PEFT adapters.

Everything is made here from a built-in text in under a minute on two CPU cores (about 40 s), so the
whole system runs with no download. The base model is trained briefly on the text and on word games;
each adapter is then trained briefly on its own toy task on prompts shaped "<2 to 4 built-in words> =>",
so the same prompt reads differently through each (greedy):

    (base model)  "the quick fox =>" -> " jumps over dog." (untrained on "=>": differs from CPU to CPU)
    uppercase     "the quick fox =>" -> " THE QUICK FOX"
    echo          "the quick fox =>" -> " the quick fox"
    count         "the quick fox =>" -> " 1 2 3 4 5 6 7 8"

tokenizer_config.json carries a small chat template that renders a user message as that prompt shape
(`{"role": "user", "content": "the quick fox"}` -> "the quick fox =>"), so the OpenAI-compatible chat
endpoint works on the demo model too.
"""

from __future__ import annotations

import json
import logging
import random
import time
import warnings
from pathlib import Path

import torch

from data_plane.engine import intra_op

log = logging.getLogger(__name__)

SEED = 1237  # with _INTERMEDIATE_SIZE, gives the outputs above and the README's mixes
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
TASKS = ("uppercase", "echo", "count")
_BASE_STEPS = 1400
_ADAPTER_STEPS = 200
_BASE_LR = 1e-3
_ADAPTER_LR = 2e-3
_RANK = 8
_ALPHA = 16
_VOCAB_SIZE = 1024
_INTERMEDIATE_SIZE = 320  # a multiple of 32, so int4 can group down_proj's input dimension
_BASE_PHRASES = 2000  # word-game examples in the base model's training set
_NUM_PROGRESS_LINES = 10  # progress lines over the whole training (base model and adapters)
_MAX_WORDS = 4  # the adapters' phrases have 2.._MAX_WORDS words (the base model's games one more)
# User turns are the phrase, "=>" asks for the answer; an assistant turn is the answer and EOS. System and
# developer (OpenAI's newer name for system) messages are left out: a developer message left in was the loop's
# first, so the user turn after it began with a space, a prompt shape the adapters never learned.
CHAT_TEMPLATE = (
    "{% for m in messages | rejectattr('role', 'in', ['system', 'developer']) %}"
    "{% if m['role'] == 'user' %}{% if not loop.first %}{{ ' ' }}{% endif %}{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ ' => ' + m['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ ' =>' }}{% endif %}"
)


def _words() -> list[str]:
    return [w.strip(".,") for w in _TEXT.split() if w.strip(".,").isascii() and w.strip(".,").isalpha()]


def _task_line(task: str, rng: random.Random) -> tuple[str, str]:
    """(prompt, answer) of one example of `task`."""
    words = _words()
    phrase = [rng.choice(words) for _ in range(rng.randint(2, _MAX_WORDS))]
    if task == "uppercase":
        answer = " ".join(phrase).upper()
    elif task == "echo":
        answer = " ".join(phrase)
    else:
        answer = " ".join(str(i) for i in range(1, 9))
    return f"{' '.join(phrase)} =>", f" {answer}"


def _base_examples(rng: random.Random) -> list[tuple[str, str]]:
    """The base model's (prompt, answer) examples: the built-in text and the digits (loss on all of it),
    and word games on phrases of its words (loss on the answer only) that uppercase (`^`) or copy (`|`)
    the phrase after a marker. So the base model already writes every token an adapter answers with (LoRA
    does not touch lm_head), and an adapter only has to learn which game `=>` means."""
    words = _words()
    examples = [("", line) for line in _TEXT.splitlines() * 4 + [" ".join(str(i) for i in range(1, 10))]]
    for _ in range(_BASE_PHRASES):
        phrase = [rng.choice(words) for _ in range(rng.randint(2, _MAX_WORDS + 1))]
        text = " ".join(phrase)
        marker, variant = rng.choice([("^", text.upper()), ("|", text)])
        examples.append((f"{text} {marker}", f" {variant}"))
    return examples


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    # The built-in text once, and many word games and task lines: every demo word (lowercase and
    # uppercase) becomes one token, while the rare multi-byte characters stay split into byte tokens.
    rng = random.Random(SEED)
    games = ["".join(e) for e in _base_examples(rng) if e[0]]
    corpus = _TEXT.splitlines() + games + ["".join(_task_line(t, rng)) for t in TASKS for _ in range(200)]
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


class TrainingProgress:
    """Logs one line at each tenth of all the training steps (the base model's and every adapter's): the
    share done, the phase with its step, and the time since training began. A first start on a slow
    machine trains for minutes; these lines show it is moving."""

    def __init__(self, total_steps: int, num_lines: int = _NUM_PROGRESS_LINES) -> None:
        self.total_steps = max(total_steps, 1)
        self.num_lines = num_lines
        self.num_done = 0
        self._next_line = 1
        self._started_at = time.monotonic()

    def step(self, phase: str, step: int, num_phase_steps: int) -> None:
        """Counts one step (1-based `step` of `num_phase_steps` in `phase`)."""
        self.num_done += 1
        if self.num_done * self.num_lines < self._next_line * self.total_steps:
            return
        while self._next_line * self.total_steps <= self.num_done * self.num_lines:
            self._next_line += 1
        log.info(
            "demo model training: %d%% (%s, step %d/%d), %.0f s",
            100 * self.num_done // self.total_steps,
            phase,
            step,
            num_phase_steps,
            time.monotonic() - self._started_at,
        )


def _train(
    model, parameters, batches, steps: int, lr: float, phase: str, progress: TrainingProgress
) -> float:
    """AdamW with the learning rate decaying linearly to zero over `steps`."""
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / max(steps, 1))
    model.train()
    loss = torch.tensor(0.0)
    for step in range(1, steps + 1):
        ids, labels = next(batches)
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        decay.step()
        progress.step(phase, step, steps)
    model.eval()
    return float(loss.detach())


def demo_config(tokenizer):
    """The demo model's LlamaConfig for its trained tokenizer (`_train_tokenizer`)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=128,
        intermediate_size=_INTERMEDIATE_SIZE,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=_EOS_ID,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


def write_demo_model(
    out_dir: Path, *, base_steps: int = _BASE_STEPS, adapter_steps: int = _ADAPTER_STEPS
) -> None:
    """Writes config.json, model.safetensors, tokenizer.json, tokenizer_config.json (its chat template)
    and adapters/<task>/ (PEFT) under out_dir.

    The step counts exist for tests that need the files but not well-trained adapters. Training logs
    its progress (`TrainingProgress`) at INFO. It runs torch on one thread: on a quiet 2-core machine that
    is 18% slower than two (26.1 against 31.8 steps/s), but with one other busy process two threads fall to
    6.3 steps/s against one's 22.7 (`python -m benchmarks.demo_train_threads`, benchmarks/RESULTS.md), and
    a demo trained once per machine should not take half an hour because something else was running.
    """
    with intra_op.threads(1):
        _write_demo_model(Path(out_dir), base_steps, adapter_steps)


def _write_demo_model(out_dir: Path, base_steps: int, adapter_steps: int) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # reloading a 2 MB model needs no progress bar in the user's terminal
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    tokenizer = _train_tokenizer()
    tokenizer.save(str(out_dir / "tokenizer.json"))
    tokenizer_config = {"chat_template": CHAT_TEMPLATE, "bos_token": "<s>", "eos_token": "</s>"}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    model = LlamaForCausalLM(demo_config(tokenizer))
    log.info("training the demo base model, then %d adapters", len(TASKS))
    progress = TrainingProgress(base_steps + len(TASKS) * adapter_steps)
    text = _base_examples(rng)
    batches = _batches(tokenizer, text, 16, rng)
    loss = _train(model, model.parameters(), batches, base_steps, _BASE_LR, "base model", progress)
    log.info("demo base model trained: loss %.2f", loss)
    model.save_pretrained(out_dir)
    (out_dir / "openlora_demo.json").write_text(json.dumps({"tasks": list(TASKS), "seed": SEED}, indent=2))

    for task in TASKS:
        base = LlamaForCausalLM.from_pretrained(out_dir)
        lora = LoraConfig(
            r=_RANK,
            lora_alpha=_ALPHA,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            lora_dropout=0.0,
        )
        with warnings.catch_warnings():  # transformers' deprecation notices PEFT triggers, not the user's
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = get_peft_model(base, lora)
        examples = [_task_line(task, rng) for _ in range(200)]
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        batches = _batches(tokenizer, examples, 16, rng)
        loss = _train(peft_model, trainable, batches, adapter_steps, _ADAPTER_LR, f"adapter {task}", progress)
        log.info("demo adapter %s trained: loss %.2f", task, loss)
        adapter_dir = out_dir / "adapters" / task
        peft_model.save_pretrained(adapter_dir)
        readme = adapter_dir / "README.md"
        if readme.exists():
            readme.unlink()
