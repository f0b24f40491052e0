"""Quality of a quantized base model against full precision: top-1 next-token agreement and mean KL.

    python -m benchmarks.quant_quality [--model DIR] [--num-prompts 200] [--formats int8,int4]

On a fixed, seeded set of prompts (word-game prompts "<2-4 words> =>" and plain-text prefixes, the
demo model's two kinds of input) each prompt is prefilled through the model held in full precision and in
each format, with no adapter and with every adapter under DIR/adapters/, and the next-token distributions
at the last position are compared: top-1 agreement (same argmax) and mean KL(full || quantized) in nats.
The default model is the demo model that `openlora up` writes (built here when absent). Prints a table and
writes JSON to benchmarks/results/quant_quality.json.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.report import format_table

DEFAULT_MODEL_DIR = Path(".state/demo-model")
RESULTS_PATH = Path(__file__).parent / "results" / "quant_quality.json"
_TEXT = (
    "the quick brown fox jumps over lazy dog small model serves many adapters at once one base stays "
    "resident and every request may name its own adapter loaded just in time batched together forward pass"
)
_WORDS = _TEXT.split()
_BLOCK_SIZE = 16


@dataclass(frozen=True)
class Agreement:
    format: str
    adapter: str  # "(base)" for none
    num_prompts: int
    top1_agreement: float  # fraction of prompts whose argmax equals the full-precision argmax
    mean_kl_nats: float  # mean KL(full || quantized) of the next-token distributions
    max_kl_nats: float


def fixed_prompts(num_prompts: int, seed: int = 0) -> list[str]:
    """Half word-game prompts ("w1 w2 w3 =>"), half plain-text prefixes of 3 to 8 words."""
    rng = random.Random(seed)
    prompts = []
    for i in range(num_prompts):
        if i % 2 == 0:
            prompts.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 4))) + " =>")
        else:
            start = rng.randrange(len(_WORDS))
            length = rng.randint(3, 8)
            prompts.append(" ".join(_WORDS[(start + j) % len(_WORDS)] for j in range(length)))
    return prompts


def compare(full_logits: torch.Tensor, quant_logits: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(top-1 agreement, per-row KL(full || quant) in nats) of two (N, vocab) logit batches."""
    agreement = float((full_logits.argmax(-1) == quant_logits.argmax(-1)).float().mean())
    log_p = torch.log_softmax(full_logits.double(), -1)
    log_q = torch.log_softmax(quant_logits.double(), -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (N,)
    return agreement, kl.clamp(min=0.0)


def _last_logits(model_dir: Path, fmt: str, prompts: list[list[int]], adapters: list[Path]) -> torch.Tensor:
    """(1 + len(adapters), num_prompts, vocab) float32 last-position logits, no adapter first."""
    from data_plane.adapters.peft_reader import read_peft_adapter
    from data_plane.engine.model_runner import ModelRunner
    from data_plane.engine.sequence import Sequence
    from data_plane.model.loader import load_model
    from data_plane.model.quant import QuantSettings

    max_len = max(len(p) for p in prompts)
    model, config = load_model(
        model_dir, torch.float32, torch.device("cpu"), max_len, quant=QuantSettings(fmt)
    )
    model.model.rotary.build(torch.device("cpu"))
    num_blocks = (max_len + _BLOCK_SIZE - 1) // _BLOCK_SIZE
    runner = ModelRunner(model, num_blocks, _BLOCK_SIZE, max(len(adapters), 1), 64)
    for slot, path in enumerate(adapters):
        runner.load_adapter(slot, read_peft_adapter(path, config.spec, 64, torch.float32))
    rows = []
    for slot in range(-1, len(adapters)):
        logits = []
        for prompt in prompts:
            seq = Sequence("q", list(prompt), len(prompt), block_ids=list(range(num_blocks)))
            logits.append(runner.run([seq], [len(prompt)], [slot])[1][0])
        rows.append(torch.stack(logits))
    return torch.stack(rows)


def measure(model_dir: Path, formats: list[str], num_prompts: int) -> list[Agreement]:
    from data_plane.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(model_dir)
    prompts = [tokenizer.encode(p) for p in fixed_prompts(num_prompts)]
    adapters = sorted(p for p in (model_dir / "adapters").glob("*") if p.is_dir())
    names = ["(base)", *(p.name for p in adapters)]
    full = _last_logits(model_dir, "none", prompts, adapters)
    results = []
    for fmt in formats:
        quant = _last_logits(model_dir, fmt, prompts, adapters)
        for i, name in enumerate(names):
            agreement, kl = compare(full[i], quant[i])
            results.append(Agreement(fmt, name, len(prompts), agreement, float(kl.mean()), float(kl.max())))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--formats", default="int8,int4")
    parser.add_argument("--out", type=Path, default=RESULTS_PATH)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if not (args.model / "config.json").is_file():
        from data_plane.demo import write_demo_model

        print(f"writing the demo model to {args.model} (about a minute)")
        write_demo_model(args.model)
    started = time.monotonic()
    results = measure(args.model, args.formats.split(","), args.num_prompts)
    header = ["format", "adapter", "prompts", "top-1 agreement", "mean KL (nats)", "max KL (nats)"]
    rows = [
        [
            r.format,
            r.adapter,
            r.num_prompts,
            f"{r.top1_agreement:.3f}",
            f"{r.mean_kl_nats:.2e}",
            f"{r.max_kl_nats:.2e}",
        ]
        for r in results
    ]
    print(format_table(header, rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "model": args.model.name,  # the directory name only: no machine path
                "seconds": time.monotonic() - started,
                "results": [asdict(r) for r in results],
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
