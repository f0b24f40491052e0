"""`make bench`: OpenLoRA against the PEFT peer on the same traces, and the cost of the N-th adapter.

Scenarios (issues 6 and 13):
1. offline throughput: the whole trace at t = 0 (output lengths drawn per request), OpenLoRA against
   transformers + PEFT on the same trace: static batches with `adapter_names` at every size of a sweep
   (8, 16, 32, 64), and one request at a time with `set_adapter` on a prefix; the ratio against the
   peer's best static batch size. Run order: peer sweep, system, peer's best size again;
2. capacity: for 1 and 1,000 adapters (every one of them requested during the search), the highest
   request rate sustained with TTFT p99 under a bound, found by a rate search (benchmarks/capacity.py);
   the ratio of capacity at the most adapters to one adapter;
3. scale: many adapters registered (a few distinct full adapters requested + small filler adapters),
   a trace touching every full one on a worker with 32 slots: errors, worker resident memory, usage
   events recorded exactly once;
4. cost: GPU-hours per million tokens at scenario 2's measured capacities, shared worker against one
   deployment per adapter sized for its own peak (benchmarks/cost.py);
5. transports (issue 14; run with `--scenarios 5`, not by default): the same traces through gRPC and
   through the OpenAI-compatible HTTP API (streamed SSE), alternated, offline for throughput and paced
   for TTFT; targets: HTTP throughput at least 0.9x gRPC's, TTFT p50 within 10 ms of it.

The system is started as a user starts it (`openlora up`, embedded Postgres and Redis unless URLs are
given). Writes benchmarks/results/bench*.json and PNG plots, prints one table, and (full runs) updates the
issue-6 section of benchmarks/RESULTS.md.

    python -m benchmarks.run            # full run (sized for about 15 minutes on 2 quiet CPU cores)
    python -m benchmarks.run --quick    # smoke run (about 2 minutes on a quiet machine)
    python -m benchmarks.run --scenarios 1,2,4 --s2-steps 4    # shorter: no scale run, 4 search steps

Each phase's end time and the load average as it started go into the results' method notes.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path

from benchmarks import fixtures
from benchmarks.capacity import (
    COVER_SHARE,
    AdapterSchedule,
    CapacitySearch,
    SearchConfig,
    step_trace,
)
from benchmarks.cost import estimate_cost
from benchmarks.load import RequestRecord, format_summary, run_load, summarize
from benchmarks.report import write_outputs
from benchmarks.run_config import BenchConfig, config_from_args
from benchmarks.system import MemorySampler, RunningSystem, SystemConfig, register_adapters, start_system
from benchmarks.trace import Trace, TraceConfig, TraceRequest, adapter_name, generate_trace, write_trace

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
MIB = 1 << 20


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


def warm_adapters(system: RunningSystem, api_key: str, names: list[str], wave: int = 32) -> dict:
    """One 1-token request per adapter so each is on the worker before timing (the peer, too, loads every
    adapter before it is timed), sent in waves of `wave` adapters at once: a thousand first fetches at
    the same instant only measure the fetch path's queueing. Returns the summary of all the waves, with
    a few of its errors' details."""
    if not names:
        return {}
    requests = [TraceRequest(i, 0.0, name, (100, 101, 102, 103), 1) for i, name in enumerate(names)]
    records: list[dict] = []
    started = time.perf_counter()
    for begin in range(0, len(requests), wave):
        result = run_load(
            requests[begin : begin + wave],
            system.inference_target,
            api_key,
            run_tag=f"warm-{uuid.uuid4().hex[:8]}",
        )
        records += result["records"]
    summary = summarize([RequestRecord(**r) for r in records], started, time.perf_counter())
    details = {f"{r['error']}: {r['error_detail']}" for r in records if r["error"] is not None}
    summary["error_samples"] = sorted(details)[:5]
    print(
        f"warm-up: {summary['completed']}/{len(names)} adapters in {summary['duration_s']:.1f} s"
        + (f", errors {summary['errors_by_code']}: {summary['error_samples']}" if summary["errors"] else "")
    )
    return summary


def scenario_offline(cfg: BenchConfig, system: RunningSystem, trace: Trace) -> dict:
    """Every adapter of the trace loaded, one untimed pass of its first requests, then the timed trace
    `cfg.s1_passes` times; the better pass's figures, with every pass's tokens/s."""
    warm, warm_pass = {}, {}
    if cfg.warmup:
        warm = warm_adapters(system, system.api_key, trace.adapters_used)
        first = trace.requests[: cfg.s1_warmup_requests]
        if first:
            warm_pass = run_load(first, system.inference_target, system.api_key)["summary"]
    runs = []
    for i in range(cfg.s1_passes):
        runs.append(run_load(trace.requests, system.inference_target, system.api_key))
        print(
            f"scenario 1: OpenLoRA offline, {len(trace.requests)} requests, pass {i + 1} of {cfg.s1_passes}\n"
            f"{format_summary(runs[-1]['summary'])}"
        )
    passes = [r["summary"]["tokens_per_s"] for r in runs]
    best = runs[passes.index(max(passes))]
    return {"warmup": warm, "warmup_pass": warm_pass, "passes_tokens_per_s": passes, **best}


def peer_runs(cfg: BenchConfig, batch_sizes: tuple[int, ...], sequential: bool) -> list:
    from benchmarks.peer_peft import PeerRun

    runs = [PeerRun("sequential", 1, cfg.peer_sequential_requests)] if sequential else []
    return runs + [PeerRun("batched", size, 0) for size in batch_sizes]


def scenario_peer(
    cfg: BenchConfig, model_dir: Path, adapters_root: Path, trace: Trace, runs: list
) -> list[dict]:
    """The PEFT peer on scenario 1's trace: every adapter loaded, the same untimed warm-up pass as the
    system's, then each run of `runs` timed."""
    from benchmarks.peer_peft import benchmark_peer

    results = benchmark_peer(
        model_dir,
        adapters_root,
        trace.requests,
        runs,
        warmup_requests=cfg.s1_warmup_requests if cfg.warmup else 0,
        dtype=cfg.shape.dtype,
        device=cfg.device,
    )
    for r in results:
        print(
            f"scenario 1: PEFT {r.strategy} (batch {r.batch_size}), {r.num_requests} requests: "
            f"{r.tokens_per_s:.1f} tokens/s ({r.generated_tokens} requested tokens, {r.computed_tokens} "
            f"computed; {r.adapters_loaded} adapters loaded in {r.adapter_load_s:.1f} s)"
        )
    return [asdict(r) for r in results]


def best_peer(sweep: list[dict], confirm: list[dict] | None = None) -> dict:
    """The peer's best static batch size of the sweep, with its figure of each pass (the sweep's and the
    confirming pass after the system ran); its tokens/s is the better of them."""
    batched = [r for r in sweep if r["strategy"] == "batched"]
    best = dict(max(batched, key=lambda r: r["tokens_per_s"]))
    passes = [best["tokens_per_s"]]
    passes += [r["tokens_per_s"] for r in confirm or [] if r["batch_size"] == best["batch_size"]]
    best["passes_tokens_per_s"] = passes
    best["tokens_per_s"] = max(passes)
    return best


def s2_step_trace(cfg: BenchConfig, schedule: AdapterSchedule, index: int, rate: float) -> Trace:
    """Step `index` of a capacity search at `rate`: at least s2_step_s of arrivals and s2_step_min_requests
    requests, more where the schedule's coverage needs them; lengths and prompts from the step's seed."""
    num_requests = max(cfg.s2_step_min_requests, math.ceil(rate * cfg.s2_step_s), schedule.min_requests())
    base = TraceConfig(
        num_requests=0,
        num_adapters=0,
        cv=1.0,
        prompt_len_range=cfg.prompt_len_range,
        output_len_range=cfg.output_len_range,
        seed=cfg.seed + 20 + index,
    )
    return step_trace(base, rate, schedule.next_step(num_requests), schedule.num_adapters)


def scenario_capacity(cfg: BenchConfig, system: RunningSystem, start_rate: float, runs: list[dict]) -> dict:
    """Capacity of each configuration of `cfg.s2_adapters` (every one of its adapters requested over its
    search). The searches alternate step by step (forward, then backward), so that a busy moment of the
    machine falls on every configuration alike. Appends each configuration's run to `runs` first and fills
    it step by step, so an interrupted run keeps the steps it measured; returns the warm-up's summary."""
    names = [adapter_name(i) for i in range(max(cfg.s2_adapters))]
    warm = warm_adapters(system, system.api_key, names) if cfg.warmup else {}
    search_config = SearchConfig(
        start_rate_per_s=start_rate,
        ttft_p99_bound_ms=cfg.s2_ttft_p99_bound_ms,
        growth=cfg.s2_growth,
        num_steps=cfg.s2_steps,
    )
    searches = []
    for n in cfg.s2_adapters:
        schedule = AdapterSchedule(n, cfg.alpha, cfg.s2_steps, seed=cfg.seed + 2)
        run: dict = {"num_adapters": n, "complete": False, "steps": []}
        update_capacity(run, schedule)
        runs.append(run)
        searches.append((run, schedule, CapacitySearch(search_config)))
    for index in range(cfg.s2_steps):
        for run, schedule, search in searches if index % 2 == 0 else searches[::-1]:
            n, rate = run["num_adapters"], search.next_rate()
            trace = s2_step_trace(cfg, schedule, index, rate)
            _save_trace(cfg, trace, f"s2-{n}-adapters-step{index}")
            result = run_load(trace.requests, system.inference_target, system.api_key)
            outcome = search.record(result["summary"])
            print(
                f"scenario 2: {n} adapters, step {index + 1}/{cfg.s2_steps} at {rate:.2f} requests/s "
                f"({'sustained' if outcome.sustained else 'NOT sustained'})\n{format_summary(result['summary'])}"
            )
            run["steps"].append(
                {
                    "rate_per_s": rate,
                    "sustained": outcome.sustained,
                    "mean_requested_tokens": trace.total_output_tokens / len(trace.requests),
                    "summary": result["summary"],
                    "records": result["records"],
                }
            )
            update_capacity(run, schedule)
    for run, _, search in searches:
        run["complete"] = True
        print(
            f"scenario 2: {run['num_adapters']} adapters sustain {run['capacity_rate_per_s']:.2f} requests/s "
            f"({run['capacity_tokens_per_s']:.1f} tokens/s) with TTFT p99 <= {cfg.s2_ttft_p99_bound_ms:.0f} ms"
            + ("" if search.result().bracketed else " (not bracketed by a failed and a sustained step)")
            + f"; {run['adapters_requested']} of {run['num_adapters']} adapters requested"
        )
    return warm


def update_capacity(run: dict, schedule: AdapterSchedule) -> None:
    """Sets a capacity run's figures from its steps so far: the highest sustained rate (and its tokens/s:
    the rate times the mean requested tokens of that step, all of which completed), the lowest failed."""
    sustained = [step for step in run["steps"] if step["sustained"]]
    failed = [step["rate_per_s"] for step in run["steps"] if not step["sustained"]]
    top = max(sustained, key=lambda step: step["rate_per_s"], default=None)
    run["capacity_rate_per_s"] = top["rate_per_s"] if top else 0.0
    run["capacity_tokens_per_s"] = top["rate_per_s"] * top["mean_requested_tokens"] if top else 0.0
    run["failed_rate_per_s"] = min(failed, default=None)
    run["bracketed"] = top is not None and bool(failed)
    run["adapters_requested"] = len(schedule.requested)


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
    """Scenario 5 as a small Markdown table (printed, and appended to the notes of RESULTS.md). The figures
    are over the requests that succeeded, so neither target is met while a request of either transport
    failed in any pass."""
    rows = [
        "| transport | offline tokens/s (best) | paced TTFT p50 ms (best) | paced TTFT p99 ms | failed requests |",
        "| --- | --- | --- | --- | --- |",
    ]
    errors = {t: sum(s["errors"] for s in s5["offline"][t] + s5["paced"][t]) for t in ("grpc", "http")}
    for t in ("grpc", "http"):
        tokens = max(s["tokens_per_s"] for s in s5["offline"][t])
        p99 = min(s["ttft_ms"]["p99"] for s in s5["paced"][t])
        rows.append(f"| {t} | {tokens:.1f} | {s5['ttft_p50_ms'][t]:.1f} | {p99:.1f} | {errors[t]} |")
    ratio, delta = s5["throughput_ratio_http_to_grpc"], s5["ttft_p50_delta_ms"]
    clean = not any(errors.values())
    rows.append(
        f"\nHTTP/gRPC throughput {ratio:.3f} (target >= 0.9: {'met' if clean and ratio >= 0.9 else 'NOT met'}); "
        f"TTFT p50 HTTP - gRPC {delta:+.1f} ms "
        f"(target within 10 ms: {'met' if clean and abs(delta) <= 10 else 'NOT met'}); "
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


def scenario_cost(cfg: BenchConfig, s2_runs: list[dict]) -> list[dict]:
    """Per configuration of scenario 2, the cost of a trace of its adapters (each requested at least once,
    power law over the rest) at its measured capacity: the shared worker delivers that configuration's
    capacity, a dedicated deployment (one adapter) that of the configuration with the fewest adapters."""
    measured = [run for run in s2_runs if run["capacity_tokens_per_s"] > 0]
    if not measured:
        return []
    dedicated = min(measured, key=lambda run: run["num_adapters"])
    rows = []
    for run in measured:
        n, rate = run["num_adapters"], run["capacity_rate_per_s"]
        trace = _trace(
            cfg,
            num_requests=max(n, math.ceil(rate * cfg.s4_duration_s)),
            num_adapters=n,
            rate_per_s=rate,
            cv=1.0,
            cover_all_adapters=True,
            seed=cfg.seed + 4,
        )
        duration_s = max(r.arrival_s for r in trace.requests) + 1.0
        estimate = estimate_cost(
            trace.requests,
            shared_capacity_tokens_per_s=run["capacity_tokens_per_s"],
            dedicated_capacity_tokens_per_s=dedicated["capacity_tokens_per_s"],
            window_s=min(10.0, duration_s),
            duration_s=duration_s,
        )
        rows.append(
            {
                "num_adapters": n,
                "rate_per_s": rate,
                "dedicated_capacity_from": dedicated["num_adapters"],
                **asdict(estimate),
                "ratio": estimate.ratio,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_args(argv, __doc__)
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
        results["s2_capacity"] = s2_runs
    if 4 in cfg.scenarios and s2_runs:
        results["s4_cost"] = scenario_cost(cfg, s2_runs)
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
        # The peer runs while the system is down: its sweep before the system starts, its best size again
        # after the system stopped, so that neither shares the machine with the other and a busy moment
        # shows as a difference between the two passes.
        note_load(results, "peer sweep")
        runs = peer_runs(cfg, cfg.peer_batch_sizes, sequential=cfg.peer_sequential_requests > 0)
        results["s1_peer_sweep"] = scenario_peer(cfg, model_dir, adapters_root, s1_trace, runs)
        results["s1_peer"] = best_peer(results["s1_peer_sweep"])
        note_phase(results, "peer sweep", started)
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
            note_phase(results, "system start and registration", started)
            if 1 in cfg.scenarios:
                note_load(results, "scenario 1")
                results["s1_openlora"] = scenario_offline(cfg, system, s1_trace)
                note_phase(results, "scenario 1", started)
            if 2 in cfg.scenarios:
                note_load(results, "scenario 2")
                results["s2_warmup"] = scenario_capacity(cfg, system, s2_start_rate(cfg, results), s2_runs)
                note_phase(results, "scenario 2", started)
            if 3 in cfg.scenarios:
                note_load(results, "scenario 3")
                results["s3_scale"] = scenario_scale(cfg, system, small_dirs)
                note_phase(results, "scenario 3", started)
            if 5 in cfg.scenarios:
                note_load(results, "scenario 5")
                results["s5_transports"] = scenario_transports(cfg, system)
                note_phase(results, "scenario 5", started)
            results["worker_rss_mib_end"] = system.worker_process().memory_info().rss / MIB
    finally:
        if cfg.state_dir is None:
            shutil.rmtree(state_dir, ignore_errors=True)
    if 1 in cfg.scenarios:
        note_load(results, "peer best size again")
        size = results["s1_peer"]["batch_size"]
        results["s1_peer_confirm"] = scenario_peer(
            cfg, model_dir, adapters_root, s1_trace, peer_runs(cfg, (size,), sequential=False)
        )
        results["s1_peer"] = best_peer(results["s1_peer_sweep"], results["s1_peer_confirm"])
        note_phase(results, "peer best size again", started)


def s2_start_rate(cfg: BenchConfig, results: dict) -> float:
    """The search's first rate, the same for every configuration."""
    if cfg.s2_start_rate_per_s is not None:
        return cfg.s2_start_rate_per_s
    s1 = results.get("s1_openlora", {}).get("summary")
    if s1 and s1["requests_per_s"] > 0:
        return cfg.s2_start_fraction * s1["requests_per_s"]
    return cfg.s2_start_rate_fallback_per_s


def note_load(results: dict, phase: str) -> None:
    """Records the 1-minute load average as a phase starts: the machine is shared, and this says how much."""
    results.setdefault("load_average", []).append([phase, round(os.getloadavg()[0], 2)])


def note_phase(results: dict, phase: str, started: float) -> None:
    """Records how far into the run (seconds) a phase ended."""
    results.setdefault("phase_end_s", []).append([phase, round(time.perf_counter() - started, 1)])


def method_notes(cfg: BenchConfig, results: dict) -> str:
    """How the figures were obtained, for RESULTS.md."""
    s3 = results.get("s3_scale")
    low, high = cfg.output_len_range
    notes = [
        "How it was measured:",
        "- The system runs as `openlora up` (embedded Postgres and Redis, control plane and worker as child "
        "processes); the load generator (`benchmarks/load.py`, asyncio gRPC, open loop) shares the CPUs "
        "with it. TTFT is measured by the client from each request's scheduled arrival time.",
        f"- Output lengths: each request of scenarios 1 and 2 asks for its own number of tokens, drawn "
        f"uniformly from {low}-{high} with the trace's seed; both systems decode greedily and generate "
        "exactly that many (the model never emits its end token), and only those tokens count as output.",
        f"- {cfg.num_full_adapters} full adapters were uploaded through `AdminService.UploadAdapter` "
        f"({results.get('register_full_s', 0):.0f} s).",
    ]
    if 1 in cfg.scenarios:
        sizes = ", ".join(str(n) for n in cfg.peer_batch_sizes)
        sequential = (
            f" One request at a time (`set_adapter`, then `generate`) was timed on the first "
            f"{cfg.peer_sequential_requests} requests only, for reference; it is not the comparison target."
            if cfg.peer_sequential_requests
            else ""
        )
        warm = (
            f"then ran the trace's first {cfg.s1_warmup_requests} requests once, untimed (the peer as one "
            "static batch, OpenLoRA all at t = 0)"
            if cfg.warmup
            else "with no warm-up pass"
        )
        notes += [
            f"- Scenario 1: the same trace of {cfg.s1_requests} requests over {cfg.s1_adapters} adapters "
            "(power law) for both systems, every request at t = 0. Warm-up, alike for both: every adapter of "
            "the trace loaded before timing (the peer by `load_adapter`, OpenLoRA by one 1-token request per "
            "adapter, 32 adapters at a time, which brings its artifact onto the worker; device slots still "
            "refill during the run), "
            f"{warm}.",
            "- The PEFT peer (transformers + PEFT in one process) replays the whole trace in static batches "
            "in arrival order, left-padded, with `adapter_names` (mixed adapters in one batch) and "
            "`min_new_tokens = max_new_tokens =` the batch's longest request: a batch runs until its longest "
            "request ends, and the tokens its shorter requests decode past their own length are padding "
            f"work (reported as computed tokens), not output. It was swept over static batch sizes {sizes} "
            "before the system started; its best size ran the whole trace again after the system stopped, "
            "and the better of that size's two passes is what OpenLoRA is compared with. OpenLoRA ran the "
            f"timed trace {cfg.s1_passes} times in a row, and its better pass counts likewise." + sequential,
        ]
    if 2 in cfg.scenarios:
        configs = " and ".join(str(n) for n in cfg.s2_adapters)
        start = (
            f"{cfg.s2_start_rate_per_s} requests/s"
            if cfg.s2_start_rate_per_s is not None
            else f"{cfg.s2_start_fraction:.0%} of the requests/s OpenLoRA reached in scenario 1"
        )
        notes.append(
            f"- Scenario 2 measures capacity: for {configs} adapters, the highest request rate at which "
            f"every request succeeded with TTFT p99 <= {cfg.s2_ttft_p99_bound_ms:.0f} ms, found by a search "
            f"of {cfg.s2_steps} steps per configuration (`benchmarks/capacity.py`): from {start} (the same "
            f"start for every configuration), x{cfg.s2_growth} after a sustained step and /{cfg.s2_growth} "
            "after a failed one, then bisection (geometric mean) between the highest sustained and the "
            "lowest failed rate. Each step is an open-loop replay with Gamma arrivals (cv 1) lasting at least "
            f"{cfg.s2_step_s:.0f} s of arrivals and {cfg.s2_step_min_requests} requests, so its p99 rests on "
            "at least that many TTFTs (with about a hundred, p99 is close to their maximum: a stricter test "
            "than a long run's p99); the worker drains between steps. The configurations' searches "
            "alternate step by step (step 1 of each in order, step 2 in reverse order, ...), so a busy "
            "moment of the machine falls on all of them alike. Step k has the same lengths and "
            "prompts in every configuration. Every adapter of a configuration is requested during its "
            "search: each step requests its share of the adapters not yet requested (at most "
            f"{COVER_SHARE:.0%} of its requests; a step is lengthened where that needs more requests than "
            "the minimum, which if anything makes it harder to sustain), the rest follow the power law "
            f"(alpha {cfg.alpha}). "
            + (
                f"Before the searches, one 1-token request per adapter ({max(cfg.s2_adapters)}, 32 at a time) "
                "brought every artifact onto the worker (host memory, or its disk cache past the host tier's "
                "cap); the warm-up's errors, if any, are in the results file. "
                if cfg.warmup
                else ""
            )
            + "Capacity in tokens/s is the capacity rate times the mean requested tokens of that step "
            "(every request of a sustained step completed its tokens). The bound is on TTFT only: a rate a "
            "little above what the worker decodes in steady state can pass a short step while its running "
            "batch grows (the queue, and TTFT with it, only rises once max-num-seqs sequences run), so each "
            "step's inter-token latency is listed beside it; the same holds for every configuration."
        )
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
    if 4 in cfg.scenarios:
        notes.append(
            "- Scenario 4 prices, per configuration of scenario 2, a trace of its adapters (each requested at "
            f"least once, power law over the rest, about {cfg.s4_duration_s:.0f} s) arriving at the capacity "
            "measured for it: the shared worker delivers that configuration's measured capacity in tokens/s, "
            "a dedicated deployment (serving one adapter) the capacity measured with the fewest adapters; "
            "each is sized for its peak 10 s window of requested tokens and runs at least one replica for "
            "the whole trace."
        )
    if results.get("load_average"):
        loads = ", ".join(f"{phase} {load}" for phase, load in results["load_average"])
        notes.append(f"- 1-minute load average of the machine as each phase started: {loads}.")
    if results.get("phase_end_s"):
        ends = ", ".join(f"{phase} {end:.0f} s" for phase, end in results["phase_end_s"])
        notes.append(f"- Time into the run at which each phase ended: {ends}.")
    return "\n".join(notes) + "\n"


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
