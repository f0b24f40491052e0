"""`make bench`: OpenLoRA against the PEFT peer on the same traces, and the cost of the N-th adapter.

Scenarios (issue 6):
1. offline throughput: every request at t = 0, OpenLoRA against PEFT (one request at a time with
   `set_adapter`, and static batches with `adapter_names`), the ratio against the better PEFT strategy;
2. 1, 10, 100, 1000 adapters at the same request rate (a fraction of scenario 1's measured capacity):
   throughput and TTFT p50/p99 for each, and the ratio of throughput at the most adapters to one adapter;
3. scale: many adapters registered (a few distinct full adapters requested + small filler adapters),
   a trace touching every full one on a worker with 32 slots: errors, worker resident memory, usage
   events recorded exactly once;
4. cost: GPU-hours per million tokens for scenario 2's traces, shared worker against one deployment per
   adapter sized for its own peak (benchmarks/cost.py);
5. transports (issue 14; run with `--scenarios 5`, not by default): the same traces through gRPC and
   through the OpenAI-compatible HTTP API (streamed SSE), alternated, offline for throughput and paced
   for TTFT; targets: HTTP throughput at least 0.9x gRPC's, TTFT p50 within 10 ms of it.

The system is started as a user starts it (`openlora up`, embedded Postgres and Redis unless URLs are
given). Writes benchmarks/results/bench*.json and PNG plots, prints one table, and (full runs) updates the
issue-6 section of benchmarks/RESULTS.md.

    python -m benchmarks.run            # full run (about 10 minutes on 2 CPU cores)
    python -m benchmarks.run --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from benchmarks import fixtures
from benchmarks.cost import estimate_cost
from benchmarks.load import format_summary, run_load
from benchmarks.report import write_outputs
from benchmarks.system import MemorySampler, RunningSystem, SystemConfig, register_adapters, start_system
from benchmarks.trace import Trace, TraceConfig, TraceRequest, adapter_name, generate_trace, write_trace

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
MIB = 1 << 20


@dataclass(frozen=True)
class BenchConfig:
    scenarios: tuple[int, ...] = (1, 2, 3, 4)  # scenario 5 (transports) on request: --scenarios 5
    quick: bool = False
    seed: int = 0
    alpha: float = 1.0
    prompt_len_range: tuple[int, int] = (16, 48)
    output_len_range: tuple[int, int] = (16, 16)
    # Scenario 1
    s1_requests: int = 256
    s1_adapters: int = 100
    peer_sequential_requests: int = 24
    peer_batched_requests: int = 64
    peer_batch_size: int = 32
    # Scenario 2
    s2_adapters: tuple[int, ...] = (1, 10, 100, 1000)
    s2_duration_s: float = 30.0
    s2_rate_per_s: float | None = None  # None: s2_rate_fraction x scenario 1's requests/s
    s2_rate_fraction: float = 0.6
    # Scenario 3
    s3_registered: int = 10_000
    s3_touched: int = 1000
    s3_requests: int = 1000
    s3_small_artifacts: int = 300
    s3_prompt_len_range: tuple[int, int] = (8, 16)
    s3_output_len_range: tuple[int, int] = (2, 2)
    s3_rate_per_s: float = 15.0
    # Scenario 5: gRPC against HTTP, each trace run `s5_passes` times per transport, alternating.
    s5_requests: int = 128
    s5_adapters: int = 16
    s5_rate_fraction: float = 0.5  # the paced trace's rate: this fraction of gRPC's offline requests/s
    s5_passes: int = 3
    # Model, adapters and device
    model_shape: str = fixtures.LLAMA_50M.name
    adapter_targets: tuple[str, ...] = fixtures.ALL_PROJECTIONS
    device: str = "cpu"
    # System
    num_adapter_slots: int = 32
    max_num_seqs: int = 128
    max_waiting: int = 4096
    # The worker's adapter host-memory tier (--host-cache-bytes): what bounds its resident memory.
    host_cache_bytes: int = 1 << 30
    kv_cache_bytes: int | None = None  # None: the worker's default
    warmup: bool = True
    database_url: str | None = None
    redis_url: str | None = None
    state_dir: Path | None = None
    results_dir: Path = RESULTS_DIR
    update_results_md: bool = True
    # RESULTS.md section this run replaces (the GPU run keeps its own).
    results_marker: str = "benchmarks.run"
    command: str = "python -m benchmarks.run"

    @property
    def shape(self) -> fixtures.ModelShape:
        return fixtures.SHAPES[self.model_shape]

    @property
    def adapter_spec(self) -> fixtures.AdapterSpec:
        dtype = "bfloat16" if self.device.startswith("cuda") else "float16"
        return fixtures.AdapterSpec(dtype=dtype, target_modules=self.adapter_targets)

    @property
    def num_full_adapters(self) -> int:
        needed = [0]
        if 1 in self.scenarios:
            needed.append(self.s1_adapters)
        if 2 in self.scenarios:
            needed.append(max(self.s2_adapters))
        if 3 in self.scenarios:
            needed.append(self.s3_touched)
        if 5 in self.scenarios:
            needed.append(self.s5_adapters)
        return max(needed)


QUICK = dict(
    quick=True,
    prompt_len_range=(8, 16),
    output_len_range=(8, 8),
    s1_requests=24,
    s1_adapters=8,
    peer_sequential_requests=4,
    peer_batched_requests=8,
    peer_batch_size=4,
    s2_adapters=(1, 4, 16),
    s2_duration_s=6.0,
    s3_registered=60,
    s3_touched=20,
    s3_requests=24,
    s3_small_artifacts=10,
    s3_rate_per_s=8.0,
    s5_requests=16,
    s5_adapters=4,
    s5_passes=1,
    update_results_md=False,
)

# On one GPU (benchmarks/gpu_e2e.sh): a 1.1B Llama in bf16, rank-16 adapters on q/v (4.5 MB each, so
# that a thousand of them can be written, uploaded and fetched within the GPU check's time limit).
GPU = dict(
    scenarios=(1, 2, 4),
    model_shape=fixtures.LLAMA_1B.name,
    adapter_targets=("q_proj", "v_proj"),
    device="cuda",
    prompt_len_range=(32, 128),
    output_len_range=(64, 64),
    s1_requests=256,
    s1_adapters=100,
    peer_sequential_requests=8,
    peer_batched_requests=64,
    peer_batch_size=32,
    s2_adapters=(100, 1000),
    s2_duration_s=20.0,
    max_num_seqs=256,
    kv_cache_bytes=16 << 30,
    results_marker="benchmarks.run.gpu",
)


def machine_info() -> dict:
    cpu_model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import psutil
    import torch

    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": round(psutil.virtual_memory().total / (1 << 30), 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def _trace(cfg: BenchConfig, **overrides) -> Trace:
    base = TraceConfig(
        num_requests=0,
        num_adapters=0,
        alpha=cfg.alpha,
        prompt_len_range=cfg.prompt_len_range,
        output_len_range=cfg.output_len_range,
        seed=cfg.seed,
    )
    return generate_trace(replace(base, **overrides))


def _save_trace(cfg: BenchConfig, trace: Trace, name: str) -> None:
    write_trace(trace, cfg.results_dir / "traces" / f"{name}.jsonl")


def warm_adapters(system: RunningSystem, api_key: str, names: list[str]) -> dict:
    """One 1-token request per adapter so each is on the worker before timing (the peer, too, loads every
    adapter before it is timed)."""
    if not names:
        return {}
    requests = [TraceRequest(i, 0.0, name, (100, 101, 102, 103), 1) for i, name in enumerate(names)]
    result = run_load(requests, system.inference_target, api_key, run_tag=f"warm-{uuid.uuid4().hex[:8]}")
    return result["summary"]


def scenario_offline(cfg: BenchConfig, system: RunningSystem, trace: Trace) -> dict:
    warm = warm_adapters(system, system.api_key, trace.adapters_used) if cfg.warmup else {}
    result = run_load(trace.requests, system.inference_target, system.api_key)
    print(
        f"scenario 1: OpenLoRA offline, {len(trace.requests)} requests\n{format_summary(result['summary'])}"
    )
    return {"warmup": warm, **result}


def scenario_peer(cfg: BenchConfig, model_dir: Path, adapters_root: Path, trace: Trace) -> list[dict]:
    from benchmarks.peer_peft import benchmark_peer

    results = benchmark_peer(
        model_dir,
        adapters_root,
        trace.requests,
        {"sequential": cfg.peer_sequential_requests, "batched": cfg.peer_batched_requests},
        batch_size=cfg.peer_batch_size,
        dtype=cfg.shape.dtype,
        device=cfg.device,
    )
    for r in results:
        print(
            f"scenario 1: PEFT {r.strategy} (batch {r.batch_size}), first {r.num_requests} requests: "
            f"{r.tokens_per_s:.1f} tokens/s ({r.adapters_loaded} adapters loaded in {r.adapter_load_s:.1f} s)"
        )
    return [asdict(r) for r in results]


def scenario_num_adapters(
    cfg: BenchConfig, system: RunningSystem, rate_per_s: float, runs: list[dict]
) -> None:
    """Appends one run per number of adapters to `runs` (so an interrupted run keeps the finished ones)."""
    num_requests = max(8, round(rate_per_s * cfg.s2_duration_s))
    for n in cfg.s2_adapters:
        trace = _trace(
            cfg, num_requests=num_requests, num_adapters=n, rate_per_s=rate_per_s, cv=1.0, seed=cfg.seed + 2
        )
        _save_trace(cfg, trace, f"s2-{n}-adapters")
        warm = warm_adapters(system, system.api_key, trace.adapters_used) if cfg.warmup else {}
        result = run_load(trace.requests, system.inference_target, system.api_key)
        print(f"scenario 2: {n} adapters at {rate_per_s:.2f} requests/s\n{format_summary(result['summary'])}")
        runs.append({"num_adapters": n, "rate_per_s": rate_per_s, "warmup": warm, "trace": trace, **result})


def scenario_scale(cfg: BenchConfig, system: RunningSystem, small_dirs: list[Path]) -> dict:
    tag = uuid.uuid4().hex[:8]
    tenant = f"scale-{tag}"
    with system.admin(operator=True) as admin:
        admin.create_tenant(tenant)
        api_key = admin.create_api_key(tenant=tenant).secret
    num_filler = max(0, cfg.s3_registered - cfg.s3_touched)
    filler = [(f"filler-{i:05d}", small_dirs[i % len(small_dirs)]) for i in range(num_filler)]
    register_s = register_adapters(system, filler, tenant=tenant, concurrency=4)
    print(f"scenario 3: registered {num_filler} filler adapters in {register_s:.1f} s")
    with system.admin(operator=True) as admin:
        registered = sum(1 for _ in admin.list_adapters(tenant=tenant, page_size=1000))
        registered += sum(1 for _ in admin.list_adapters(tenant=system.config.tenant, page_size=1000))
    trace = _trace(
        cfg,
        num_requests=max(cfg.s3_requests, cfg.s3_touched),
        num_adapters=cfg.s3_touched,
        rate_per_s=cfg.s3_rate_per_s,
        cv=1.0,
        prompt_len_range=cfg.s3_prompt_len_range,
        output_len_range=cfg.s3_output_len_range,
        cover_all_adapters=True,
        seed=cfg.seed + 3,
    )
    _save_trace(cfg, trace, "s3-scale")
    worker = system.worker_process()
    with MemorySampler(worker) as memory:
        result = run_load(trace.requests, system.inference_target, api_key, run_tag=f"scale-{tag}")
    summary = result["summary"]
    print(
        f"scenario 3: {len(trace.adapters_used)} distinct adapters, {registered} registered\n{format_summary(summary)}"
    )
    usage = wait_for_usage(system, tenant, summary["completed"], summary["completion_tokens"])
    return {
        "tenant": tenant,
        "registered_adapters": registered,
        "filler_adapters": num_filler,
        "filler_distinct_artifacts": min(len(small_dirs), num_filler),
        "filler_register_s": register_s,
        "distinct_adapters_touched": len(trace.adapters_used),
        "host_cache_mib": cfg.host_cache_bytes / MIB,
        "worker_rss_mib": {
            "first": memory.first_bytes / MIB,
            "peak": memory.peak_bytes / MIB,
            "last": memory.last_bytes / MIB,
            "samples": [
                round(b / MIB, 1) for b in memory.samples_bytes[:: max(1, len(memory.samples_bytes) // 200)]
            ],
        },
        "usage": usage,
        **result,
    }


def scenario_transports(cfg: BenchConfig, system: RunningSystem) -> dict:
    """The same two traces (all at t = 0, then paced at a fraction of gRPC's offline capacity) through gRPC
    and through the HTTP API, alternating the order pass by pass; the best pass of each counts."""
    context = json.loads((system.config.state_dir / "context.json").read_text())
    base_url, base_model = context["openai_base_url"], system.config.model_dir.name
    offline = _trace(cfg, num_requests=cfg.s5_requests, num_adapters=cfg.s5_adapters, seed=cfg.seed + 5)
    _save_trace(cfg, offline, "s5-offline")
    if cfg.warmup:
        warm_adapters(system, system.api_key, offline.adapters_used)

    def run(trace: Trace, transport: str) -> dict:
        target = base_url if transport == "http" else system.inference_target
        return run_load(trace.requests, target, system.api_key, transport=transport, base_model=base_model)

    def passes(trace: Trace, label: str) -> dict[str, list[dict]]:
        results: dict[str, list[dict]] = {"grpc": [], "http": []}
        for i in range(cfg.s5_passes):
            for transport in ("grpc", "http") if i % 2 == 0 else ("http", "grpc"):
                summary = run(trace, transport)["summary"]
                results[transport].append(summary)
                print(f"scenario 5: {label} over {transport}, pass {i + 1}\n{format_summary(summary)}")
        return results

    offline_runs = passes(offline, "offline")
    capacity = max(s["requests_per_s"] for s in offline_runs["grpc"])
    rate = cfg.s5_rate_fraction * capacity
    paced = _trace(
        cfg,
        num_requests=cfg.s5_requests,
        num_adapters=cfg.s5_adapters,
        rate_per_s=rate,
        cv=1.0,
        seed=cfg.seed + 6,
    )
    _save_trace(cfg, paced, "s5-paced")
    paced_runs = passes(paced, f"paced at {rate:.2f} requests/s")
    best = {t: max(offline_runs[t], key=lambda s: s["tokens_per_s"]) for t in ("grpc", "http")}
    ttft = {t: min(s["ttft_ms"]["p50"] for s in paced_runs[t]) for t in ("grpc", "http")}
    result = {
        "rate_per_s": rate,
        "offline": offline_runs,
        "paced": paced_runs,
        "throughput_ratio_http_to_grpc": best["http"]["tokens_per_s"] / best["grpc"]["tokens_per_s"],
        "ttft_p50_ms": ttft,
        "ttft_p50_delta_ms": ttft["http"] - ttft["grpc"],
    }
    print(transports_table(result))
    return result


def transports_table(s5: dict) -> str:
    """Scenario 5 as a small Markdown table (printed, and appended to the notes of RESULTS.md)."""
    rows = [
        "| transport | offline tokens/s (best) | paced TTFT p50 ms (best) | paced TTFT p99 ms |",
        "| --- | --- | --- | --- |",
    ]
    for t in ("grpc", "http"):
        tokens = max(s["tokens_per_s"] for s in s5["offline"][t])
        p99 = min(s["ttft_ms"]["p99"] for s in s5["paced"][t])
        rows.append(f"| {t} | {tokens:.1f} | {s5['ttft_p50_ms'][t]:.1f} | {p99:.1f} |")
    ratio, delta = s5["throughput_ratio_http_to_grpc"], s5["ttft_p50_delta_ms"]
    rows.append(
        f"\nHTTP/gRPC throughput {ratio:.3f} (target >= 0.9: {'met' if ratio >= 0.9 else 'NOT met'}); "
        f"TTFT p50 HTTP - gRPC {delta:+.1f} ms (target within 10 ms: {'met' if abs(delta) <= 10 else 'NOT met'}); "
        f"paced at {s5['rate_per_s']:.2f} requests/s."
    )
    return "\n".join(rows)


def wait_for_usage(
    system: RunningSystem, tenant: str, requests: int, tokens: int, timeout_s: float = 60.0
) -> dict:
    """Polls GetUsage until the tenant's recorded requests reach `requests` (the worker reports in batches;
    the tenant is new, so everything it used is from this run)."""
    deadline = time.monotonic() + timeout_s
    with system.admin(operator=True) as admin:
        while True:
            usage = admin.get_usage(tenant=tenant)
            if usage.total_requests >= requests or time.monotonic() > deadline:
                break
            time.sleep(1.0)
    return {
        "expected_requests": requests,
        "recorded_requests": usage.total_requests,
        "expected_completion_tokens": tokens,
        "recorded_completion_tokens": usage.total_completion_tokens,
        "exactly_once": usage.total_requests == requests and usage.total_completion_tokens == tokens,
    }


def scenario_cost(s2_runs: list[dict], capacity_tokens_per_s: float) -> list[dict]:
    rows = []
    for run in s2_runs:
        trace: Trace = run["trace"]
        duration_s = max(r.arrival_s for r in trace.requests) + 1.0
        estimate = estimate_cost(
            trace.requests,
            shared_capacity_tokens_per_s=capacity_tokens_per_s,
            dedicated_capacity_tokens_per_s=capacity_tokens_per_s,
            window_s=min(10.0, duration_s),
            duration_s=duration_s,
        )
        rows.append({"num_adapters": run["num_adapters"], **asdict(estimate), "ratio": estimate.ratio})
    return rows


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_args(argv)
    cfg.results_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    machine = machine_info()
    print(f"machine: {machine['nproc']} CPUs ({machine['cpu_model']}), {machine['memory_gib']} GiB")
    model_dir = fixtures.ensure_model(cfg.shape)
    full_dirs = fixtures.ensure_adapters(cfg.num_full_adapters, cfg.shape, cfg.adapter_spec)
    adapters_root = fixtures.adapters_root(cfg.shape, cfg.adapter_spec)
    small_dirs = (
        fixtures.ensure_small_adapters(cfg.s3_small_artifacts, cfg.shape) if 3 in cfg.scenarios else []
    )
    print(
        f"fixtures ready: {len(full_dirs)} full adapters, {len(small_dirs)} small ({time.perf_counter() - started:.0f} s)"
    )
    shape = cfg.shape
    results: dict = {
        "config": jsonable(asdict(cfg)),
        "machine": machine,
        "started_at": utc_now(),
        "model": {
            "name": shape.name,
            "parameters_m": round(shape.num_parameters / 1e6, 1),
            "hidden_size": shape.hidden_size,
            "num_layers": shape.num_layers,
            "vocab_size": shape.vocab_size,
            "dtype": shape.dtype,
            "adapter_rank": cfg.adapter_spec.rank,
            "adapter_targets": list(cfg.adapter_targets),
            "adapter_dtype": cfg.adapter_spec.dtype,
        },
    }
    s2_runs: list[dict] = []
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        run_scenarios(cfg, results, s2_runs, model_dir, full_dirs, adapters_root, small_dirs, started)
    except (Exception, KeyboardInterrupt) as error:
        # A failed or interrupted run still writes what it measured, marked as incomplete.
        results["incomplete"] = f"{type(error).__name__}: {error}"
        print(f"run stopped early: {results['incomplete']}", file=sys.stderr)
    if s2_runs:
        results["s2_num_adapters"] = [{k: v for k, v in run.items() if k != "trace"} for run in s2_runs]
    if 4 in cfg.scenarios and s2_runs and "s1_openlora" in results:
        capacity = results["s1_openlora"]["summary"]["tokens_per_s"]
        results["s4_cost"] = scenario_cost(s2_runs, capacity)
    results["elapsed_s"] = time.perf_counter() - started
    results["notes"] = method_notes(cfg, results)
    if "s5_transports" in results:
        results["notes"] += "\nScenario 5, gRPC against HTTP (SSE) on the same traces:\n\n"
        results["notes"] += transports_table(results["s5_transports"]) + "\n"
    write_outputs(results, cfg.results_dir, RESULTS_MD if cfg.update_results_md else None, cfg.results_marker)
    return 1 if "incomplete" in results else 0


def _interrupt(*_) -> None:
    raise KeyboardInterrupt("SIGTERM")


def run_scenarios(
    cfg: BenchConfig,
    results: dict,
    s2_runs: list[dict],
    model_dir: Path,
    full_dirs: list[Path],
    adapters_root: Path,
    small_dirs: list[Path],
    started: float,
) -> None:
    """Runs the selected scenarios, filling `results` and `s2_runs` as each one finishes."""
    s1_trace = _trace(cfg, num_requests=cfg.s1_requests, num_adapters=cfg.s1_adapters, seed=cfg.seed + 1)
    if 1 in cfg.scenarios:
        _save_trace(cfg, s1_trace, "s1-offline")
        # The peer runs while the system is down, before and after it, so that neither shares the machine
        # with the other; the better of its two passes counts (a busy moment only slows one pass).
        note_load(results, "peer pass 1")
        results["s1_peer_passes"] = [scenario_peer(cfg, model_dir, adapters_root, s1_trace)]
        results["s1_peer"] = best_peer(results["s1_peer_passes"])
    state_dir = cfg.state_dir or Path(tempfile.mkdtemp(prefix="openlora-bench-"))
    system_config = SystemConfig(
        model_dir=model_dir,
        state_dir=state_dir,
        database_url=cfg.database_url,
        redis_url=cfg.redis_url,
        device=cfg.device,
        worker_args=(
            f"--num-adapter-slots={cfg.num_adapter_slots}",
            f"--max-num-seqs={cfg.max_num_seqs}",
            f"--max-waiting={cfg.max_waiting}",
            f"--host-cache-bytes={cfg.host_cache_bytes}",
            *([f"--kv-cache-bytes={cfg.kv_cache_bytes}"] if cfg.kv_cache_bytes else []),
        ),
    )
    try:
        with start_system(system_config) as system:
            print(f"system up after {time.perf_counter() - started:.0f} s: {system.inference_target}")
            names = [(adapter_name(i), d) for i, d in enumerate(full_dirs)]
            results["register_full_s"] = register_adapters(system, names, public=True)
            print(f"registered {len(names)} full adapters in {results['register_full_s']:.1f} s")
            results["worker_rss_mib_after_register"] = system.worker_process().memory_info().rss / MIB
            if 1 in cfg.scenarios:
                note_load(results, "scenario 1")
                results["s1_openlora"] = scenario_offline(cfg, system, s1_trace)
            if 2 in cfg.scenarios:
                rate = cfg.s2_rate_per_s
                if rate is None:
                    s1 = results.get("s1_openlora", {}).get("summary")
                    rate = cfg.s2_rate_fraction * s1["requests_per_s"] if s1 else 1.0
                note_load(results, "scenario 2")
                scenario_num_adapters(cfg, system, rate, s2_runs)
            if 3 in cfg.scenarios:
                note_load(results, "scenario 3")
                results["s3_scale"] = scenario_scale(cfg, system, small_dirs)
            if 5 in cfg.scenarios:
                note_load(results, "scenario 5")
                results["s5_transports"] = scenario_transports(cfg, system)
            results["worker_rss_mib_end"] = system.worker_process().memory_info().rss / MIB
    finally:
        if cfg.state_dir is None:
            shutil.rmtree(state_dir, ignore_errors=True)
    if 1 in cfg.scenarios:
        note_load(results, "peer pass 2")
        results["s1_peer_passes"].append(scenario_peer(cfg, model_dir, adapters_root, s1_trace))
        results["s1_peer"] = best_peer(results["s1_peer_passes"])


def note_load(results: dict, phase: str) -> None:
    """Records the 1-minute load average as a phase starts: the machine is shared, and this says how much."""
    results.setdefault("load_average", []).append([phase, round(os.getloadavg()[0], 2)])


def best_peer(passes: list[list[dict]]) -> list[dict]:
    """Per strategy, the pass with the highest throughput, with every pass's figure beside it."""
    best: dict[str, dict] = {}
    for results in passes:
        for r in results:
            current = best.get(r["strategy"])
            if current is None or r["tokens_per_s"] > current["tokens_per_s"]:
                best[r["strategy"]] = dict(r)
    for strategy, r in best.items():
        r["passes_tokens_per_s"] = [
            p["tokens_per_s"] for results in passes for p in results if p["strategy"] == strategy
        ]
    return list(best.values())


def method_notes(cfg: BenchConfig, results: dict) -> str:
    """How the figures were obtained, for RESULTS.md."""
    s3 = results.get("s3_scale")
    notes = [
        "How it was measured:",
        "- The system runs as `openlora up` (embedded Postgres and Redis, control plane and worker as child "
        "processes); the load generator (`benchmarks/load.py`, asyncio gRPC, open loop) shares the 2 CPUs "
        "with it. TTFT is measured by the client from each request's scheduled arrival time.",
        f"- {cfg.num_full_adapters} full adapters were uploaded through `AdminService.UploadAdapter` "
        f"({results.get('register_full_s', 0):.0f} s). Before each timed run of scenarios 1 and 2, one "
        "1-token request per adapter of the trace brought its artifact onto the worker (the PEFT peer, "
        "too, loads every adapter before it is timed); device slots still have to be refilled during the run.",
        "- The PEFT peer ran twice, before the system started and after it stopped (the better pass counts), "
        f"in one process, with every adapter of scenario 1's "
        f"trace loaded by `load_adapter`; it was timed on the first {cfg.peer_sequential_requests} "
        f"(sequential) and {cfg.peer_batched_requests} (static batches of {cfg.peer_batch_size}) requests of "
        "the same trace, because its throughput does not depend on the trace length and the full trace would "
        "take minutes. `min_new_tokens = max_new_tokens`, so it generates exactly the requested tokens.",
        "- Scenario 2's rate is "
        + (
            f"{cfg.s2_rate_fraction:.0%} of the requests/s OpenLoRA reached in scenario 1"
            if cfg.s2_rate_per_s is None
            else f"fixed at {cfg.s2_rate_per_s} requests/s"
        )
        + f" (Gamma arrivals, cv 1), about {cfg.s2_duration_s:.0f} s per number of adapters.",
    ]
    if s3:
        notes.append(
            f"- Scenario 3 registry: {s3['registered_adapters']} adapter rows in all: the "
            f"{cfg.num_full_adapters} full adapters above (public, owned by the bench tenant) plus "
            f"{s3['filler_adapters']} names uploaded through `UploadAdapter` by a fresh tenant, pointing to "
            f"{s3['filler_distinct_artifacts']} distinct small artifacts (rank 4 on q/v; the control plane "
            f"deduplicates by sha256; {s3['filler_register_s']:.0f} s). The trace ({cfg.s3_requests} requests "
            f"at {cfg.s3_rate_per_s} requests/s, {cfg.s3_output_len_range[0]} tokens each) requests every one of "
            f"the {s3['distinct_adapters_touched']} full adapters at least once, with no warm-up: first calls "
            "are fetched from the control plane. Usage is read back with `GetUsage` for that tenant. The "
            f"worker's adapter host tier is capped at {cfg.host_cache_bytes / MIB:.0f} MiB (`--host-cache-bytes`); "
            "its resident memory is sampled every 0.2 s during the run."
        )
    if results.get("load_average"):
        loads = ", ".join(f"{phase} {load}" for phase, load in results["load_average"])
        notes.append(f"- 1-minute load average of the machine as each phase started: {loads}.")
    notes.append(
        "- Scenario 4 sizes every deployment by the throughput OpenLoRA measured in scenario 1 (10 s windows "
        "of requested tokens); a dedicated deployment needs at least one replica for the whole trace."
    )
    return "\n".join(notes) + "\n"


def config_from_args(argv: list[str] | None) -> BenchConfig:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run with tiny sizes (RESULTS.md untouched)"
    )
    parser.add_argument(
        "--gpu", action="store_true", help="GPU profile: 1.1B bf16 Llama on cuda, scenarios 1, 2, 4"
    )
    parser.add_argument(
        "--scenarios", default=None, help="comma-separated subset of 1,2,3,4,5 (default: all)"
    )
    parser.add_argument("--database-url", default=None, help="default: embedded PostgreSQL")
    parser.add_argument("--redis-url", default=None, help="default: embedded Redis")
    parser.add_argument("--state-dir", type=Path, default=None, help="kept after the run; default a temp dir")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--s1-requests", type=int)
    parser.add_argument("--s2-adapters", help="comma-separated numbers of adapters, e.g. 1,10,100,1000")
    parser.add_argument("--s2-duration-s", type=float)
    parser.add_argument("--s2-rate", type=float, help="requests/s; default a fraction of scenario 1's")
    parser.add_argument("--s3-registered", type=int)
    parser.add_argument("--s3-touched", type=int)
    parser.add_argument("--s3-requests", type=int)
    parser.add_argument("--s3-rate", type=float)
    parser.add_argument("--output-len", type=int, help="tokens generated per request (scenarios 1 and 2)")
    parser.add_argument("--no-warmup", action="store_true")
    parser.add_argument("--no-results-md", action="store_true", help="do not update benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    cfg = BenchConfig(**GPU) if args.gpu else BenchConfig()
    if args.quick:
        cfg = replace(cfg, **{k: v for k, v in QUICK.items() if not (args.gpu and k == "update_results_md")})
    overrides: dict = {
        "database_url": args.database_url,
        "redis_url": args.redis_url,
        "state_dir": args.state_dir,
        "results_dir": args.results_dir,
        "warmup": not args.no_warmup,
        "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    for flag, key in (
        ("s1_requests", "s1_requests"),
        ("s2_duration_s", "s2_duration_s"),
        ("s2_rate", "s2_rate_per_s"),
        ("s3_registered", "s3_registered"),
        ("s3_touched", "s3_touched"),
        ("s3_requests", "s3_requests"),
        ("s3_rate", "s3_rate_per_s"),
    ):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    if args.scenarios:
        overrides["scenarios"] = tuple(sorted(int(s) for s in args.scenarios.split(",") if s))
    if args.s2_adapters:
        overrides["s2_adapters"] = tuple(int(n) for n in args.s2_adapters.split(","))
    if args.output_len:
        overrides["output_len_range"] = (args.output_len, args.output_len)
    if args.no_results_md:
        overrides["update_results_md"] = False
    return replace(cfg, **overrides)


def jsonable(value):
    """A config (as `asdict` gives it) fit for a results file: paths by name, service URLs left out."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items() if k not in ("database_url", "redis_url")}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return value.name
    return value


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


if __name__ == "__main__":
    sys.exit(main())
