"""How fast the demo model trains on one torch thread against two (why `write_demo_model` uses one).

Runs the demo base model's training steps (its tokenizer, config, batches and AdamW) for `--steps` steps
per pass, passes alternating between 1 and 2 threads, and prints steps/s per pass and the median per
thread count. The machine's load average is printed with each pass: the two-thread figure depends on it.

    python -m benchmarks.demo_train_threads [--steps 30] [--passes 2]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch

from data_plane import demo


def steps_per_s(threads: int, steps: int) -> float:
    from transformers import LlamaForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tokenizer = demo._train_tokenizer()
    model = LlamaForCausalLM(demo.demo_config(tokenizer))
    rng = random.Random(0)
    batches = demo._batches(tokenizer, demo._base_examples(rng), 16, rng)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    started = time.perf_counter()
    for _ in range(steps):
        ids, labels = next(batches)
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return steps / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> dict[int, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--passes", type=int, default=2)
    args = parser.parse_args(argv)
    figures: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.passes):
        for threads in (1, 2):
            rate = steps_per_s(threads, args.steps)
            figures[threads].append(rate)
            print(f"threads {threads}: {rate:.1f} steps/s (load {os.getloadavg()[0]:.2f})", flush=True)
    for threads, rates in figures.items():
        print(f"median, {threads} thread(s): {statistics.median(rates):.1f} steps/s")
    return figures


if __name__ == "__main__":
    main()
