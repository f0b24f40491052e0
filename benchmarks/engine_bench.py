"""Engine decode step time on the CPU: 32 concurrent requests on 32 distinct adapters vs no adapter.

A ~50M-parameter Llama (hidden 512, 6 layers, vocab 32000, random weights written by transformers, fp32)
and 32 rank-16 adapters on all seven projections (PEFT layout). Two engines live in this one process on
the same weights: "base" runs 32 requests on the base model, "multi" runs 32 requests each on its own
adapter. Their steps are interleaved one by one (base, multi, base, ...) so both see the same machine
load, and each step is timed with perf_counter. Only steady steps count: all 32 requests decoding one
token. Finished requests are replaced, so the batch stays at 32; the replacement's prefill step is not
counted. The figure judged is the ratio of median step times (target: multi >= 0.8 x base throughput).

    python -m benchmarks.engine_bench [--steps 500] [--warmup-steps 8] [--decode-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from data_plane.engine.config import EngineConfig
from data_plane.engine.llm_engine import LLMEngine
from data_plane.engine.request import AdapterRef, EngineRequest, SamplingOptions
from openlora.artifact import digest_dir

NUM_REQUESTS = 32
RANK = 16
PROMPT_TOKENS = 32
RESULTS_PATH = Path(__file__).parent / "results" / "engine_bench.json"
TARGET_RATIO = 0.8


# -- statistics ------------------------------------------------------------------------------------------


def percentile(values: list[float], fraction: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); fraction in [0, 1]."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def step_stats(step_times_s: list[float], tokens_per_step: int) -> dict:
    """Median and 10th-percentile step time of one engine, and tokens/s from each."""
    median_s = percentile(step_times_s, 0.5)
    p10_s = percentile(step_times_s, 0.1)
    return {
        "steps": len(step_times_s),
        "median_step_ms": median_s * 1e3,
        "p10_step_ms": p10_s * 1e3,
        "tokens_per_s_median": tokens_per_step / median_s,
        "tokens_per_s_p10": tokens_per_step / p10_s,
        # the old whole-run figure: all counted tokens over all counted time
        "tokens_per_s_whole_run": tokens_per_step * len(step_times_s) / sum(step_times_s),
    }


def compare(base_step_times_s: list[float], multi_step_times_s: list[float], tokens_per_step: int) -> dict:
    """Per-engine stats and multi/base throughput ratios (= base step time / multi step time)."""
    base = step_stats(base_step_times_s, tokens_per_step)
    multi = step_stats(multi_step_times_s, tokens_per_step)
    return {
        "base": base,
        "multi": multi,
        "ratio_median": base["median_step_ms"] / multi["median_step_ms"],
        "ratio_p10": base["p10_step_ms"] / multi["p10_step_ms"],
        "ratio_whole_run": multi["tokens_per_s_whole_run"] / base["tokens_per_s_whole_run"],
        # each base step against the multi step right after it: cancels load that drifts slowly
        "ratio_median_of_pairs": percentile(
            [b / m for b, m in zip(base_step_times_s, multi_step_times_s, strict=False)], 0.5
        ),
    }


# -- workload --------------------------------------------------------------------------------------------


def write_model(root: Path) -> tuple[Path, list[Path]]:
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=2048,
    )
    model = LlamaForCausalLM(config)
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=32, target_modules=targets))
    template = root / "template"
    peft_model.save_pretrained(template)
    shapes = {
        name.replace(".default", ""): tuple(p.shape)
        for name, p in peft_model.named_parameters()
        if "lora_" in name
    }
    adapter_dirs = []
    for i in range(NUM_REQUESTS):
        adapter_dir = root / f"adapter{i:02d}"
        adapter_dir.mkdir()
        (adapter_dir / "adapter_config.json").write_text((template / "adapter_config.json").read_text())
        tensors = {name: torch.randn(shape) * 0.02 for name, shape in shapes.items()}
        save_file(tensors, str(adapter_dir / "adapter_model.safetensors"))
        adapter_dirs.append(adapter_dir)
    return model_dir, adapter_dirs


@dataclass
class SteadyDriver:
    """Keeps one engine at `num_requests` running requests (request i always on adapters[i], if any) and
    times its steps; a step counts when all requests were decoding one token each."""

    name: str
    engine: LLMEngine
    adapters: list[AdapterRef] | None
    decode_tokens: int
    num_requests: int = NUM_REQUESTS
    num_added: int = 0

    def __post_init__(self) -> None:
        self.slot_of_request: dict[str, int] = {}
        for i in range(self.num_requests):
            self._add(i)

    def request(self, i: int, request_id: str, prompt: list[int], sampling: SamplingOptions) -> EngineRequest:
        """The request kept in place i (the same place always gets the same adapters)."""
        adapters = (self.adapters[i % len(self.adapters)],) if self.adapters else ()
        return EngineRequest(request_id, prompt, sampling, adapters)

    def _add(self, i: int) -> None:
        vocab = self.engine.spec.vocab_size
        prompt = [(7 * i + 13 * self.num_added + j) % (vocab - 100) + 50 for j in range(PROMPT_TOKENS)]
        request_id = f"{self.name}-{self.num_added}"
        self.num_added += 1
        self.slot_of_request[request_id] = i
        sampling = SamplingOptions(max_tokens=self.decode_tokens)
        self.engine.add_request(self.request(i, request_id, prompt, sampling))

    def restart(self) -> None:
        """Aborts every request and adds fresh ones, so two drivers restarted together stay in phase
        (same context lengths at the same interleaved step)."""
        for request_id in list(self.slot_of_request):
            self.engine.abort(request_id)
        self.slot_of_request.clear()
        for i in range(self.num_requests):
            self._add(i)

    def is_steady(self) -> bool:
        return self.engine.num_running == self.num_requests and all(
            s.num_pending_tokens == 1 for s in self.engine.scheduler.running
        )

    def step(self) -> float | None:
        """One engine step; its time in seconds if it was a steady decode step, else None."""
        steady = self.is_steady()
        started = time.perf_counter()
        outputs = self.engine.step()
        elapsed_s = time.perf_counter() - started
        new_tokens = sum(len(o.new_token_ids) for o in outputs)
        for output in outputs:
            if output.error is not None:
                raise RuntimeError(f"{self.name} request {output.request_id} failed") from output.error
            slot = self.slot_of_request.get(output.request_id)
            if output.finished and slot is not None:  # aborted requests were already replaced
                del self.slot_of_request[output.request_id]
                self._add(slot)
        if steady and new_tokens == self.num_requests:
            return elapsed_s
        return None


def make_engine(model_dir: Path) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model_dir=model_dir,
            dtype="float32",
            num_adapter_slots=NUM_REQUESTS,
            max_num_seqs=NUM_REQUESTS,
            max_num_batched_tokens=2048,
            kv_cache_bytes=512 << 20,
            max_lora_rank=RANK,
        )
    )


def run_interleaved(
    base: SteadyDriver, multi: SteadyDriver, steps: int, warmup_steps: int
) -> tuple[list[float], list[float], dict[str, int]]:
    """Warms both engines up (adapters loaded, `warmup_steps` steady steps each, discarded), restarts
    both request sets together, then steps base, multi, base, ... until each has `steps` steady steps.
    Returns the two lists of step times in seconds and the unsteady steps skipped per engine."""
    drivers = {"base": base, "multi": multi}
    times_s: dict[str, list[float]] = {"base": [], "multi": []}
    unsteady = {"base": 0, "multi": 0}
    for phase_steps in (max(warmup_steps, 1), steps):
        if phase_steps == steps:
            for tag in drivers:
                drivers[tag].restart()
                times_s[tag] = []
        max_calls = 20 * phase_steps + 1000  # guards against an engine that never gets steady
        for _ in range(max_calls):
            if all(len(t) >= phase_steps for t in times_s.values()):
                break
            for tag, driver in drivers.items():
                if len(times_s[tag]) >= phase_steps:
                    continue
                elapsed_s = driver.step()
                if elapsed_s is None:
                    unsteady[tag] += 1
                else:
                    times_s[tag].append(elapsed_s)
        else:
            counts = {tag: len(t) for tag, t in times_s.items()}
            raise RuntimeError(f"engines not steady after {max_calls} steps: {counts}")
    return times_s["base"], times_s["multi"], unsteady


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500, help="counted steady steps per engine")
    parser.add_argument("--warmup-steps", type=int, default=8, help="steady steps discarded per engine")
    parser.add_argument("--decode-tokens", type=int, default=128, help="max_tokens of each request")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup_steps < 0 or args.decode_tokens < 2:
        parser.error("--steps >= 1, --warmup-steps >= 0, --decode-tokens >= 2")
    load_before = os.getloadavg()
    started_at = datetime.now(UTC)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        model_dir, adapter_dirs = write_model(root)
        print(f"wrote the model and {len(adapter_dirs)} adapters in {time.perf_counter() - started:.1f} s")
        adapters = [AdapterRef(digest_dir(d), d) for d in adapter_dirs]
        base = SteadyDriver("base", make_engine(model_dir), None, args.decode_tokens)
        multi = SteadyDriver("multi", make_engine(model_dir), adapters, args.decode_tokens)
        started = time.perf_counter()
        base_times_s, multi_times_s, unsteady = run_interleaved(base, multi, args.steps, args.warmup_steps)
        run_s = time.perf_counter() - started
        base.engine.shutdown()
        multi.engine.shutdown()
    load_after = os.getloadavg()
    stats = compare(base_times_s, multi_times_s, NUM_REQUESTS)
    result = {
        "benchmark": "engine_bench",
        "method": "one process, base and multi steps interleaved; steady decode steps timed one by one",
        "at": started_at.isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "model": "llama hidden 512, 6 layers, vocab 32000, fp32",
        "requests": NUM_REQUESTS,
        "adapter_rank": RANK,
        "prompt_tokens": PROMPT_TOKENS,
        "decode_tokens_per_request": args.decode_tokens,
        "warmup_steps": args.warmup_steps,
        "unsteady_steps_skipped": unsteady,
        "interleaved_run_s": run_s,
        "target_ratio": TARGET_RATIO,
        **stats,
        "step_ms": {
            "base": [round(t * 1e3, 3) for t in base_times_s],
            "multi": [round(t * 1e3, 3) for t in multi_times_s],
        },
    }
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(json.dumps(result, indent=2))
    print(
        f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min) on {os.cpu_count()} CPUs"
    )
    print(f"{'case':<28}{'median ms':>11}{'p10 ms':>9}{'tok/s (median)':>16}{'tok/s (whole)':>15}")
    for label, s in (("no adapter", stats["base"]), ("32 distinct adapters (r16)", stats["multi"])):
        print(
            f"{label:<28}{s['median_step_ms']:>11.2f}{s['p10_step_ms']:>9.2f}"
            f"{s['tokens_per_s_median']:>16.1f}{s['tokens_per_s_whole_run']:>15.1f}"
        )
    print(
        f"ratio multi/base: median {stats['ratio_median']:.3f} (target >= {TARGET_RATIO}), "
        f"p10 {stats['ratio_p10']:.3f}, median of pairs {stats['ratio_median_of_pairs']:.3f}, whole run {stats['ratio_whole_run']:.3f}"
    )
    print(f"{args.steps} steps per engine in {run_s:.1f} s; wrote {RESULTS_PATH}")


if __name__ == "__main__":
    main()
