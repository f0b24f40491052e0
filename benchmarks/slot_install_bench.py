"""What copying an adapter from host memory into a slot costs while the engine steps, as the worker's copy
thread does it: `ModelRunner.install_from_host` called from a second thread beside a thread that keeps an
engine decoding 32 requests (no adapters, so the slot copied into is never one a step reads).

    python -m benchmarks.slot_install_bench                  # CPU: the 50M fixture model, float32
    python -m benchmarks.slot_install_bench --device cuda    # GPU: the 1.1B fixture model, bfloat16

Two ways of copying, alternated adapter by adapter, `--repeats` times over `--adapters` adapters (rank 16
on q_proj and v_proj, the end-to-end benchmark's), median and p90 in milliseconds, idle (engine not
stepping) and beside the stepping engine:
- replayed: the copy as the worker makes it (the slot's writes recorded once per slot and shapes, and on
  CUDA the staging buffer and its views kept);
- recorded per copy: the same code with those records emptied before each copy, so every copy makes its
  views again: the torch calls per copy of the copy before the records were kept.
Every torch call of the copying thread releases the interpreter and must take it back from the stepping
thread; the torch calls per copy (counted by a TorchFunctionMode on the copying thread) are printed beside
the times. Both ways must leave the slot bit for bit the same (checked before timing).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from benchmarks import fixtures
from benchmarks.adapter_load_bench import median_p90
from benchmarks.steady_driver import SteadyDriver
from data_plane.adapters import peft_reader
from data_plane.engine.config import EngineConfig
from data_plane.engine.llm_engine import LLMEngine

TARGETS = ("q_proj", "v_proj")
RANK = 16
NUM_REQUESTS = 32
DECODE_TOKENS = 64


class _CountCalls(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def _engine(device: str, shape: fixtures.ModelShape, root: Path) -> LLMEngine:
    model_dir = fixtures.ensure_model(shape, root)
    return LLMEngine(
        EngineConfig(
            model_dir=model_dir,
            device=device,
            dtype=shape.dtype,
            num_adapter_slots=32,
            max_num_seqs=NUM_REQUESTS,
            max_num_batched_tokens=2048,
            num_kv_blocks=NUM_REQUESTS * 8,
            block_size=16,
            max_lora_rank=EngineConfig.max_lora_rank,  # the worker's default: slots as wide as served ones
        )
    )


def _forget_records(runner) -> None:
    runner._slot_plans.clear()
    for views in runner._staging_views.values():
        views.clear()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run(
    device: str,
    num_adapters: int,
    repeats: int,
    shape: fixtures.ModelShape | None = None,
    root: Path = fixtures.FIXTURES_DIR,
    settle_s: float = 2.0,
) -> dict:
    """`shape` (default: the 1.1B model on CUDA, the 50M one on the CPU) and `root` (the fixtures' folder)
    are for the tests' tiny model."""
    shape = shape or (fixtures.LLAMA_1B if device == "cuda" else fixtures.LLAMA_50M)
    spec = fixtures.AdapterSpec(
        rank=RANK, dtype=shape.dtype if device == "cuda" else "float16", target_modules=TARGETS
    )
    dirs = fixtures.ensure_adapters(num_adapters, shape, spec, root)
    engine = _engine(device, shape, root)
    runner = engine.runner
    hosts = [
        peft_reader.read_packed_adapter(
            d, engine.spec, EngineConfig.max_lora_rank, runner.dtype, pin_memory=device == "cuda"
        )
        for d in dirs
    ]
    slot = len(runner.slot_ranks) - 1

    def replayed(host) -> None:
        runner.install_from_host(slot, host)

    def recorded(host) -> None:
        _forget_records(runner)
        runner.install_from_host(slot, host)

    ways = {"replayed": replayed, "recorded_per_copy": recorded}
    for host in hosts:  # on the CPU a host copy makes its views on its first copy: not timed
        replayed(host)
    calls = {}
    for name, copy in ways.items():
        copy(hosts[0])  # the first copy of each way records (or not) what the next ones replay
        counter = _CountCalls()
        with counter:
            copy(hosts[1 % len(hosts)])
        calls[name] = counter.calls
    contents = {}
    for name, copy in ways.items():
        copy(hosts[0])
        _sync(device)
        contents[name] = [t.cpu() for t in runner.slot_contents(slot)]
    if not all(torch.equal(a, b) for a, b in zip(*contents.values(), strict=True)):
        raise AssertionError("the replayed and the recorded copy leave the slot different")

    def timed(label: str) -> dict:
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(repeats):
            for host in hosts:
                for name, copy in ways.items():
                    started = time.perf_counter()
                    copy(host)
                    times[name].append((time.perf_counter() - started) * 1000)
        return {f"{name}_{label}": median_p90(values) for name, values in times.items()}

    results = timed("idle")
    driver = SteadyDriver("steady", engine, None, DECODE_TOKENS, NUM_REQUESTS)
    stop = threading.Event()
    steps = [0]

    def step_forever() -> None:
        while not stop.is_set():
            driver.step()
            steps[0] += 1

    stepping = threading.Thread(target=step_forever, daemon=True)
    stepping.start()
    time.sleep(settle_s)  # past the first prefills
    started, steps_before = time.perf_counter(), steps[0]
    try:
        results |= timed("beside_steps")
    finally:
        stop.set()
        stepping.join(timeout=60)
        engine.shutdown()
    elapsed = time.perf_counter() - started
    return results | {
        "torch_calls_per_copy": calls,
        "engine_steps_per_s_while_copying": (steps[0] - steps_before) / elapsed,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "model": shape.name,
        "adapter_bytes_on_host": hosts[0].size_bytes,
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    results = run(args.device, args.adapters, args.repeats)
    for key, value in results.items():
        if isinstance(value, dict) and "p50" in value:
            print(f"{key:34s} p50 {value['p50']:8.3f} ms   p90 {value['p90']:8.3f} ms   (n={value['n']})")
    print("torch calls per copy:", results["torch_calls_per_copy"])
    print(f"engine steps/s while copying: {results['engine_steps_per_s_while_copying']:.1f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
