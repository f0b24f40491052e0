"""Where an engine step's time goes at a steady decode state: base linears, LoRA, attention, sampling,
scheduling.

The engine (benchmarks.fixtures' ~52M-parameter Llama, fp32) is kept at 128 requests as scenario 1 serves
them: each new request's adapter drawn from a power-law popularity (alpha 1) over 100 rank-16 adapters on
all seven projections, 32 adapter slots (`--no-adapters`: the base model). Requests have a 32-token
prompt and decode `--decode-tokens`, in four waves, so that a quarter of them finishes and is replaced
every `--decode-tokens` / 4 steps. After
`--warmup-steps`, `--steps` steps run without timers (the reference step time), then `--steps` steps run
with a timer around each part. A part's time is exclusive: its own, less the parts nested in it.

- base linears: every linear module (nn.Linear, LoRALinear, QuantLoRALinear, QuantLinear, DenseLinear,
  any module holding LoRA pools or a dense matmul) and every other `F.linear` call, lm_head included, less
  the LoRA inside them;
- LoRA: the calls of the SGMV ops (`openlora_kernels.sgmv_*`, shrink and expand), wherever the model calls them,
  and the CPU's native SGMV path (`NativeLora.add`, on float32 CPU models by default);
- attention: the attention modules (those holding a KV cache) less their projections: rotary, KV-cache
  writes, attention over the cache;
- step inputs: the model runner outside the model (building the step's metadata, gathering logits);
- sampling: the engine's sampler;
- scheduling: `LLMEngine.step` outside the runner and the sampler (scheduler, adapter cache, outputs);
- adapter loads: waiting for copies of adapters from host memory into slots. They run on the engine's
  loader thread; after each step the benchmark waits for those in flight, so that their time is counted
  here and not inside whichever part the main thread was running;
- other: the rest of the step (the forward's embedding, norms, activations and residuals, and whatever
  the timers cannot place), so that the lines add up to the profiled step.

Parts are found by module type and by the engine's public attributes (`runner`, `runner.run`,
`runner.model`, `sampler`), not by module names, so fused or renamed projections are still counted. The
serving path (gRPC, streaming, authorization, usage) is measured by benchmarks/serving_overhead.py.

    python -m benchmarks.profile_step [--steps 100] [--no-adapters] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from benchmarks.engine_bench import WAVES, percentile
from benchmarks.fixtures import LLAMA_50M, AdapterSpec, ensure_adapters, ensure_model
from benchmarks.steady_driver import (
    HOST_CACHE_BYTES,
    SkewedDriver,
    SteadyDriver,
    adapter_refs,
    make_engine,
    popularity_draws,
    prefetch_to_host,
)
from data_plane.engine.llm_engine import LLMEngine
from data_plane.model.native_lora import NativeLora
from data_plane.model.quant import QuantLinear

BASE, LORA, ATTENTION, STEP_INPUTS, SAMPLING, SCHEDULING, LOADS, OTHER = (
    "base linears (incl. lm_head)",
    "LoRA (SGMV shrink + expand)",
    "attention (incl. rotary, KV writes)",
    "step inputs (runner outside the model)",
    "sampling",
    "scheduling (engine outside the forward)",
    "adapter loads (host-to-slot copies waited for)",
    "other (embedding, norms, activations, residuals, unplaced)",
)
PARTS = (BASE, LORA, ATTENTION, STEP_INPUTS, SAMPLING, SCHEDULING, LOADS, OTHER)
NUM_REQUESTS = 128
NUM_SLOTS = 32
NUM_ADAPTERS = 100
RANK = 16
ALPHA = 1.0
RESULTS_DIR = Path(__file__).parent / "results"
QUICK = {"steps": 5, "warmup_steps": 3, "decode_tokens": 8}
SERVING_NOTE = (
    "serving (gRPC, streaming, auth, usage): not in this profile; see benchmarks/serving_overhead.py"
)


class PartTimer:
    """Exclusive wall time per part of nested regions: a region's time less that of the regions it holds.

    Inside a LoRA region nothing opens a region of its own: an SGMV op's insides are LoRA. `sync` (CUDA)
    runs before each clock read so that queued device work lands in the part that queued it."""

    def __init__(
        self, sync: Callable[[], None] | None = None, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.seconds: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self._stack: list[list] = []  # [part or None, started_s, nested_s]
        self._sync = sync
        self._clock = clock

    def enter(self, part: str) -> None:
        if self._stack and self._stack[-1][0] in (LORA, None):
            self._stack.append([None, 0.0, 0.0])
            return
        if self._sync is not None:
            self._sync()
        self._stack.append([part, self._clock(), 0.0])

    def exit(self) -> None:
        part, started_s, nested_s = self._stack.pop()
        if part is None:
            return
        if self._sync is not None:
            self._sync()
        elapsed_s = self._clock() - started_s
        self.seconds[part] += elapsed_s - nested_s
        self.calls[part] += 1
        if self._stack:
            self._stack[-1][2] += elapsed_s

    def wrap(self, fn: Callable, part: str) -> Callable:
        def timed(*args, **kwargs):
            self.enter(part)
            try:
                return fn(*args, **kwargs)
            finally:
                self.exit()

        timed.__wrapped__ = fn
        return timed


def module_part(module: nn.Module) -> str | None:
    """The part a module's own time belongs to, by what it is rather than what it is called."""
    if (
        isinstance(module, (nn.Linear, QuantLinear))
        or hasattr(module, "lora_a")
        or hasattr(module, "dense_matmul")
    ):
        # LoRALinear and QuantLoRALinear hold LoRA pools (lora_a; their SGMV calls are LoRA); DenseLinear
        # (lm_head) and LoRALinear hold the model's dense matmul.
        return BASE
    if hasattr(module, "k_cache"):
        return ATTENTION
    return None


def _is_lora_op(name: str, value: object) -> bool:
    return (
        callable(value)
        and not isinstance(value, type)
        and ("sgmv" in name or name.endswith(("shrink", "expand")))
    )


def instrument(engine: LLMEngine, timer: PartTimer) -> Callable[[], None]:
    """Puts `timer` around the parts of `engine.step`; returns the function that takes it all off again."""
    undo: list[Callable[[], None]] = []
    runner = engine.runner
    model = runner.model
    for module in model.modules():
        part = OTHER if module is model else module_part(module)
        if part is None:
            continue
        pre = module.register_forward_pre_hook(lambda _m, _a, part=part: timer.enter(part))
        post = module.register_forward_hook(lambda _m, _a, _o: timer.exit())
        undo += [pre.remove, post.remove]
    # Linears computed without a module of their own (a fused projection, say) are base linears too.
    linear = F.linear
    F.linear = timer.wrap(linear, BASE)
    undo.append(lambda: setattr(F, "linear", linear))
    # The SGMV ops, under every name a loaded module of ours holds them by.
    originals: dict[int, tuple[Callable, Callable]] = {}
    for name, module in list(sys.modules.items()):
        if module is not None and (name == "openlora_kernels" or name.startswith("openlora_kernels.")):
            for attr, value in vars(module).items():
                if _is_lora_op(attr, value) and id(value) not in originals:
                    originals[id(value)] = (value, timer.wrap(value, LORA))
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(("openlora_kernels", "data_plane")):
            continue
        for attr, value in list(vars(module).items()):
            if id(value) in originals and originals[id(value)][0] is value:
                setattr(module, attr, originals[id(value)][1])
                undo.append(lambda m=module, a=attr, v=value: setattr(m, a, v))
    # The CPU's native SGMV path: a projection's whole LoRA (kernels and long segments' matmuls) in one call.
    add = NativeLora.add
    NativeLora.add = timer.wrap(add, LORA)
    undo.append(lambda: setattr(NativeLora, "add", add))
    for owner, attr, part in (
        (runner, "run", STEP_INPUTS),
        (engine, "sampler", SAMPLING),
        (engine, "step", SCHEDULING),
        (engine.loader, "wait", LOADS),
        (engine.loader, "wait_for", LOADS),
    ):
        original, own = getattr(owner, attr), attr in vars(owner)
        setattr(owner, attr, timer.wrap(original, part))
        # a method comes back by deleting the instance's wrapper; an attribute by putting it back
        undo.append(lambda o=owner, a=attr, v=original, own=own: setattr(o, a, v) if own else delattr(o, a))

    def remove() -> None:
        for action in reversed(undo):
            action()

    return remove


def breakdown(part_seconds: dict[str, float], total_s: float) -> dict[str, float]:
    """Each part's share of `total_s`, with OTHER holding what the named parts leave (so they sum to 1)."""
    if total_s <= 0:
        raise ValueError(f"total_s must be positive, got {total_s}")
    named = {part: part_seconds.get(part, 0.0) for part in PARTS if part != OTHER}
    other = total_s - sum(named.values())
    return {**{part: s / total_s for part, s in named.items()}, OTHER: other / total_s}


def _run_steps(driver: SteadyDriver, steps: int) -> tuple[list[float], list[int], list[int]]:
    """`steps` engine steps: each step's seconds, new tokens and running sequences."""
    times_s, tokens, running = [], [], []
    for _ in range(steps):
        driver.step()
        times_s.append(driver.last_step_s)
        tokens.append(driver.last_new_tokens)
        running.append(driver.engine.num_running)
    return times_s, tokens, running


def run_profile(
    model_dir: Path,
    adapter_dirs: list[Path] | None,
    steps: int,
    warmup_steps: int,
    decode_tokens: int,
    num_requests: int = NUM_REQUESTS,
    num_slots: int = NUM_SLOTS,
    alpha: float = ALPHA,
    seed: int = 0,
) -> dict:
    """Warm-up, `steps` plain steps, then `steps` profiled steps; the parts of the profiled ones."""
    max_rank = max((_rank_of(d) for d in adapter_dirs or ()), default=RANK)
    engine = make_engine(model_dir, num_requests, decode_tokens, max_rank, num_slots)
    try:
        if adapter_dirs:
            refs = adapter_refs(adapter_dirs)
            prefetch_to_host(engine, refs)
            draws = popularity_draws(len(refs), alpha, count=100_000, seed=seed)
            driver = SkewedDriver(
                "profile", engine, refs, decode_tokens, num_requests, WAVES, settle_loads=True, draws=draws
            )
        else:
            driver = SteadyDriver("profile", engine, None, decode_tokens, num_requests, waves=WAVES)
        _run_steps(driver, warmup_steps)
        plain_s, plain_tokens, _ = _run_steps(driver, steps)
        sync = torch.cuda.synchronize if engine.runner.device.type == "cuda" else None
        timer = PartTimer(sync)
        remove = instrument(engine, timer)
        try:
            profiled_s, profiled_tokens, running = _run_steps(driver, steps)
        finally:
            remove()
    finally:
        engine.shutdown()
    total_s = sum(profiled_s)
    shares = breakdown(timer.seconds, total_s)
    return {
        "requests": num_requests,
        "slots": num_slots,
        "adapters": len(adapter_dirs or ()),
        "adapter_rank": max_rank if adapter_dirs else None,
        "popularity_alpha": alpha if adapter_dirs else None,
        "decode_tokens_per_request": decode_tokens,
        "steps": steps,
        "warmup_steps": warmup_steps,
        "mean_running_sequences": sum(running) / len(running),
        "plain": _phase(plain_s, plain_tokens),
        "profiled": _phase(profiled_s, profiled_tokens),
        "timer_overhead": sum(profiled_s) / max(sum(plain_s), 1e-12) - 1.0,
        "parts_ms_per_step": {part: share * total_s / steps * 1e3 for part, share in shares.items()},
        "parts_fraction": shares,
        "part_calls_per_step": {part: n / steps for part, n in timer.calls.items()},
        "lora_seen": timer.calls[LORA] > 0,
        "serving": SERVING_NOTE,
    }


def _phase(times_s: list[float], tokens: list[int]) -> dict:
    return {
        "mean_step_ms": sum(times_s) / len(times_s) * 1e3,
        "median_step_ms": percentile(times_s, 0.5) * 1e3,
        "tokens_per_s": sum(tokens) / sum(times_s),
    }


def _rank_of(adapter_dir: Path) -> int:
    return int(json.loads((adapter_dir / "adapter_config.json").read_text())["r"])


def format_table(figures: dict) -> str:
    lines = ["| part | ms per step | share of step |", "|---|---|---|"]
    for part in PARTS:
        lines.append(
            f"| {part} | {figures['parts_ms_per_step'][part]:.2f} | {figures['parts_fraction'][part]:.1%} |"
        )
    profiled, plain = figures["profiled"], figures["plain"]
    lines.append(f"| **step (profiled), mean** | **{profiled['mean_step_ms']:.2f}** | **100%** |")
    lines += [
        "",
        f"Without timers: mean step {plain['mean_step_ms']:.2f} ms, {plain['tokens_per_s']:.1f} tokens/s; with them "
        f"{profiled['mean_step_ms']:.2f} ms, {profiled['tokens_per_s']:.1f} tokens/s "
        f"(timer overhead {figures['timer_overhead']:+.1%}); {figures['mean_running_sequences']:.1f} sequences "
        "running per step on average.",
        SERVING_NOTE + ".",
    ]
    if figures["adapters"] and not figures["lora_seen"]:
        lines.append("WARNING: adapters ran but no SGMV op was called: LoRA time is inside the base linears.")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="plain steps, then as many profiled steps")
    parser.add_argument("--warmup-steps", type=int, default=40, help="steps run before either")
    parser.add_argument("--decode-tokens", type=int, default=64, help="max_tokens of each request")
    parser.add_argument("--no-adapters", action="store_true", help="every request on the base model")
    parser.add_argument("--requests", type=int, default=NUM_REQUESTS, help="requests kept in the engine")
    parser.add_argument("--slots", type=int, default=NUM_SLOTS, help="adapter slots")
    parser.add_argument(
        "--model-dir", type=Path, default=None, help="another checkpoint (default: the fixture)"
    )
    parser.add_argument(
        "--adapter-dirs", type=Path, nargs="+", default=None, help="its adapters, most popular first"
    )
    parser.add_argument("--seed", type=int, default=0, help="of the popularity draws")
    parser.add_argument("--quick", action="store_true", help=f"a short check that it runs: {QUICK}")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/)")
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    if (
        args.steps < 1
        or args.warmup_steps < 0
        or args.decode_tokens < 2
        or args.requests < 1
        or args.slots < 1
    ):
        parser.error("--steps >= 1, --warmup-steps >= 0, --decode-tokens >= 2, --requests >= 1, --slots >= 1")
    if args.adapter_dirs is not None and args.model_dir is None:
        parser.error("--adapter-dirs needs --model-dir")
    if args.model_dir is not None and args.adapter_dirs is None and not args.no_adapters:
        parser.error("--model-dir needs --adapter-dirs, or --no-adapters")
    if args.out is None:
        stem = "profile_step" + ("-base" if args.no_adapters else "")
        args.out = RESULTS_DIR / (stem + ("-quick.json" if args.quick else ".json"))
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    load_before = os.getloadavg()
    started_at = datetime.now(UTC)
    if args.model_dir is not None:
        model_dir, adapter_dirs, model = args.model_dir, args.adapter_dirs, str(args.model_dir)
    else:
        model_dir, model = (
            ensure_model(LLAMA_50M),
            f"{LLAMA_50M.name}: llama hidden 512, 6 layers, vocab 32000, fp32",
        )
        adapter_dirs = (
            None if args.no_adapters else ensure_adapters(NUM_ADAPTERS, LLAMA_50M, AdapterSpec(rank=RANK))
        )
    figures = run_profile(
        model_dir,
        None if args.no_adapters else adapter_dirs,
        args.steps,
        args.warmup_steps,
        args.decode_tokens,
        num_requests=args.requests,
        num_slots=args.slots,
        seed=args.seed,
    )
    load_after = os.getloadavg()
    result = {
        "benchmark": "profile_step",
        "command": "python -m benchmarks.profile_step"
        + " --no-adapters" * args.no_adapters
        + " --quick" * args.quick,
        "at": started_at.isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "model": model,
        "host_cache_bytes": HOST_CACHE_BYTES,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        **figures,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(figures))
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min); wrote {args.out}")
    print(json.dumps({part: round(share, 4) for part, share in figures["parts_fraction"].items()}))
    return result


if __name__ == "__main__":
    main()
