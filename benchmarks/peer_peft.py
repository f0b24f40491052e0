"""The peer a user would pick: Hugging Face transformers + PEFT in one process, on the same trace.

Every adapter the trace names is loaded once with `load_adapter` before timing starts, then one untimed
static batch of the trace's first requests (their own lengths) warms the model up. Two strategies:
- `sequential`: one request at a time, `set_adapter(name)` then `generate`;
- `batched`: static batches of `batch_size` in arrival order, left-padded, `generate(adapter_names=[...])`
  (PEFT's mixed-adapter batch inference). Greedy with `min_new_tokens == max_new_tokens ==` the longest
  `max_tokens` of the batch: the batch runs until its longest request is done, and a shorter request's
  extra tokens are padding work.
Throughput counts only the tokens the requests asked for (each request's `max_tokens`; the padding
work is reported as `computed_tokens`), over wall time from the first request to the last.

    python -m benchmarks.peer_peft --trace trace.jsonl --model DIR --adapters-root DIR --batch-size 8,16,32,64
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.trace import TraceRequest, read_trace

STRATEGIES = ("sequential", "batched")
BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in adapter_names
PAD_TOKEN_ID = 0


@dataclass(frozen=True)
class PeerRun:
    """One timed replay: a strategy, its static batch size (1 for sequential) and how many leading
    requests of the trace it replays (0 = all of them)."""

    strategy: str
    batch_size: int = 1
    max_requests: int = 0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.batch_size < 1 or (self.strategy == "sequential" and self.batch_size != 1):
            raise ValueError(f"batch_size must be >= 1 (1 for sequential), got {self.batch_size}")
        if self.max_requests < 0:
            raise ValueError(f"max_requests must be >= 0 (0 = all), got {self.max_requests}")


@dataclass(frozen=True)
class PeerResult:
    strategy: str
    num_requests: int
    batch_size: int
    # Tokens the requests asked for (the sum of their max_tokens): what counts as output.
    generated_tokens: int
    # Tokens decoded including the padding work of static batches (>= generated_tokens).
    computed_tokens: int
    elapsed_s: float
    tokens_per_s: float
    adapters_loaded: int
    adapter_load_s: float
    # Requests of the untimed warm-up batch run after loading the adapters.
    warmup_requests: int
    # Per request: time from the start of the run until its batch finished (the client's view).
    e2e_p50_ms: float
    e2e_p99_ms: float


def load_peer(model_dir: Path, adapter_dirs: dict[str, Path], *, dtype: str = "float32", device: str = "cpu"):
    """A PeftModel with every adapter of `adapter_dirs` loaded under its name; returns (model, load seconds)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device)
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    started = time.perf_counter()
    names = list(adapter_dirs)
    if not names:
        return model.eval(), 0.0
    peft_model = PeftModel.from_pretrained(model, adapter_dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(adapter_dirs[name], adapter_name=name)
    return peft_model.eval(), time.perf_counter() - started


def run_sequential(
    model, requests: Sequence[TraceRequest], device: str = "cpu"
) -> tuple[int, int, list[float]]:
    """One request at a time; returns (generated tokens, computed tokens, per-request finish times in s)."""
    import torch

    generated, finish_s = 0, []
    started = time.perf_counter()
    for request in requests:
        input_ids = torch.tensor([request.prompt_token_ids], device=device)
        with _adapter_scope(model, request.adapter), torch.inference_mode():
            output = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=request.max_tokens,
                min_new_tokens=request.max_tokens,
                do_sample=False,
            )
        generated += output.shape[1] - input_ids.shape[1]
        finish_s.append(time.perf_counter() - started)
    return generated, generated, finish_s


def run_batched(
    model, requests: Sequence[TraceRequest], batch_size: int, device: str = "cpu"
) -> tuple[int, int, list[float]]:
    """Static batches with mixed adapters; returns (requested tokens, computed tokens, finish times in s)."""
    import torch

    generated, computed, finish_s = 0, 0, []
    started = time.perf_counter()
    for begin in range(0, len(requests), batch_size):
        batch = requests[begin : begin + batch_size]
        longest_prompt = max(len(r.prompt_token_ids) for r in batch)
        max_new = max(r.max_tokens for r in batch)
        # (batch, longest_prompt), left-padded so every row's next token is at the same position
        input_ids = torch.full((len(batch), longest_prompt), PAD_TOKEN_ID, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, request in enumerate(batch):
            n = len(request.prompt_token_ids)
            input_ids[row, longest_prompt - n :] = torch.tensor(request.prompt_token_ids)
            attention_mask[row, longest_prompt - n :] = 1
        kwargs = {}
        if hasattr(model, "peft_config"):
            kwargs["adapter_names"] = [r.adapter or BASE_ADAPTER for r in batch]
        with torch.inference_mode():
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new,
                min_new_tokens=max_new,
                do_sample=False,
                **kwargs,
            )
        new_tokens = output.shape[1] - longest_prompt
        computed += new_tokens * len(batch)
        generated += sum(min(r.max_tokens, new_tokens) for r in batch)
        finish_s.extend([time.perf_counter() - started] * len(batch))
    return generated, computed, finish_s


class _adapter_scope:
    """Selects the request's adapter with set_adapter, or disables adapters for a base-model request."""

    def __init__(self, model, adapter: str) -> None:
        self.model, self.adapter, self.inner = model, adapter, None

    def __enter__(self):
        if not hasattr(self.model, "peft_config"):
            return self
        if self.adapter:
            self.model.set_adapter(self.adapter)
        else:
            self.inner = self.model.disable_adapter()
            self.inner.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.inner is not None:
            self.inner.__exit__(*exc)


def benchmark_peer(
    model_dir: Path,
    adapters_root: Path,
    requests: Sequence[TraceRequest],
    runs: Sequence[PeerRun],
    *,
    warmup_requests: int = 8,
    dtype: str = "float32",
    device: str = "cpu",
) -> list[PeerResult]:
    """Loads the model and every adapter the requests name, runs the first `warmup_requests` requests as
    one untimed static batch, then times each run in order (the adapters of the whole trace are loaded
    whatever prefix a run replays)."""
    import numpy as np
    import torch

    from data_plane.engine.host_memory import keep_freed_memory

    # The same malloc policy as OpenLoRA's engine process: the comparison is of serving, not of allocators.
    keep_freed_memory()
    adapter_dirs = {
        name: adapters_root / name for name in dict.fromkeys(r.adapter for r in requests if r.adapter)
    }
    model, load_s = load_peer(model_dir, adapter_dirs, dtype=dtype, device=device)
    warmup = requests[:warmup_requests]
    if warmup:
        run_batched(model, warmup, len(warmup), device)
    results = []
    for run in runs:
        replayed = requests[: run.max_requests] if run.max_requests else requests
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        if run.strategy == "sequential":
            generated, computed, finish_s = run_sequential(model, replayed, device)
        else:
            generated, computed, finish_s = run_batched(model, replayed, run.batch_size, device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed_s = time.perf_counter() - started
        e2e_ms = np.array(finish_s) * 1000.0
        results.append(
            PeerResult(
                strategy=run.strategy,
                num_requests=len(replayed),
                batch_size=run.batch_size,
                generated_tokens=generated,
                computed_tokens=computed,
                elapsed_s=elapsed_s,
                tokens_per_s=generated / elapsed_s if elapsed_s > 0 else 0.0,
                adapters_loaded=len(adapter_dirs),
                adapter_load_s=load_s,
                warmup_requests=len(warmup),
                e2e_p50_ms=float(np.percentile(e2e_ms, 50)) if len(e2e_ms) else 0.0,
                e2e_p99_ms=float(np.percentile(e2e_ms, 99)) if len(e2e_ms) else 0.0,
            )
        )
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trace", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument(
        "--adapters-root", type=Path, required=True, help="holds one directory per adapter name"
    )
    parser.add_argument("--strategy", choices=[*STRATEGIES, "both"], default="both")
    parser.add_argument(
        "--batch-size", default="32", help="static batch sizes, comma-separated (e.g. 8,16,32,64)"
    )
    parser.add_argument(
        "--max-requests",
        type=int,
        default=0,
        help="time only the first N requests (0 = all); all adapters load",
    )
    parser.add_argument("--warmup-requests", type=int, default=8)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    requests = read_trace(args.trace).requests
    runs = []
    if args.strategy in ("sequential", "both"):
        runs.append(PeerRun("sequential", 1, args.max_requests))
    if args.strategy in ("batched", "both"):
        sizes = [int(size) for size in args.batch_size.split(",") if size]
        runs += [PeerRun("batched", size, args.max_requests) for size in sizes]
    results = benchmark_peer(
        args.model,
        args.adapters_root,
        requests,
        runs,
        warmup_requests=args.warmup_requests,
        dtype=args.dtype,
        device=args.device,
    )
    for result in results:
        print(
            f"peft {result.strategy:<10} batch {result.batch_size:>3}: {result.generated_tokens} tokens in "
            f"{result.elapsed_s:.2f} s = {result.tokens_per_s:.1f} tokens/s "
            f"({result.adapters_loaded} adapters loaded in {result.adapter_load_s:.1f} s)"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps([asdict(r) for r in results], indent=2))


if __name__ == "__main__":
    main()
