"""What the serving path costs: the worker end to end against the engine alone, on the same trace.

Scenario 1's trace (every request at t = 0; by default 256 requests over 100 adapters, power-law
popularity, prompts of 16-48 tokens, 16 generated tokens each) on the benchmark model (~52M-parameter
Llama, rank-16 adapters on all seven projections), run two ways in one invocation:

- engine alone: an `LLMEngine` in this process, with the worker's engine settings (32 adapter slots, 128
  running sequences, 1 GiB adapter host tier), every request added at once, stepped until done on a
  thread of its own (as the worker steps it; see `run_engine_thread`);
- worker: `openlora up` (control plane, worker, embedded Postgres and Redis unless URLs are given), the
  trace replayed over gRPC by `benchmarks.load` (greedy, one request id per request, as `benchmarks.run`).

Warm-up, the same for both: before each side is first timed, one 1-token request per adapter of the trace,
run to completion, so that every adapter is in host memory (the worker also has its artifact on disk);
device slots still refill during the run on both sides. The two sides alternate pass by pass (engine,
worker, engine, worker, ...) while the system is up and idle between its passes; the best pass of each
counts, and the ratio worker / engine alone is printed (issue 13's target: at least 0.9), beside the
median of the per-pass ratios (each worker pass against the engine pass before it) with its bootstrap
interval: the noise of the passes, which on a shared 2-core VM is often wider than the effect measured.

Where the worker's extra time goes, for its best pass:
- CPU seconds of every process during the pass (worker: event-loop thread against its other threads,
  which run gRPC's C core and, with `--engine-core thread`, the engine loop and torch's intra-op pool;
  the worker's engine core process, where those run by default; the control plane; Postgres and Redis;
  this process, i.e. the load generator), against this process's CPU in the engine-alone pass;
- with py-spy on PATH or in the virtual env (`pip install py-spy`; `--no-py-spy` to skip), two samplers
  on the worker: the share of wall time each Python thread holds the GIL (GIL wait shows as the sum
  nearing 100%), and the engine loop's share of time inside `LLMEngine.step` against waiting for work,
  plus what the event-loop thread spends its GIL time on (functions on its stack, and innermost ones);
  a third sampler on the control plane (functions on the stack and innermost ones, any thread holding
  its GIL). The engine-alone pass gets the same GIL figure.

    python -m benchmarks.serving_overhead              # full trace, 2 passes each (a few minutes)
    python -m benchmarks.serving_overhead --quick      # smoke run: 24 requests over 8 adapters, 1 pass
    python -m benchmarks.serving_overhead --engine-core thread   # the engine loop in the worker's process
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import psutil

from benchmarks import fixtures
from benchmarks.load import format_summary, run_load
from benchmarks.stats import median_summary
from benchmarks.system import SystemConfig, register_adapters, start_system
from benchmarks.trace import Trace, TraceConfig, TraceRequest, adapter_name, generate_trace

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "serving_overhead.json"
QUICK_RESULTS_PATH = RESULTS_PATH.with_name("serving_overhead-quick.json")
TARGET_RATIO = 0.9
SAMPLE_RATE_HZ = 50


@dataclass(frozen=True)
class OverheadConfig:
    num_requests: int = 256
    num_adapters: int = 100
    prompt_len_range: tuple[int, int] = (16, 48)
    output_len_range: tuple[int, int] = (16, 16)
    alpha: float = 1.0
    seed: int = 1  # benchmarks.run's scenario 1 trace: its seed + 1
    passes: int = 2
    num_adapter_slots: int = 32
    max_num_seqs: int = 128
    max_waiting: int = 4096
    host_cache_bytes: int = 1 << 30
    py_spy: bool = True
    sample_rate_hz: int = SAMPLE_RATE_HZ  # py-spy's samples a second (more: finer profiles, more CPU taken)
    # The worker's --stream-interval (1, its default: every step's token goes at once; issue 13's target is
    # read at 1). The engine-alone side streams nothing either way.
    stream_interval: int = 1
    # The worker's --engine-core: "process" (its default: the engine loop in a process of its own) or
    # "thread" (in the worker's process, sharing its interpreter with the serving path).
    engine_core: str = "process"
    database_url: str | None = None
    redis_url: str | None = None
    results_path: Path = RESULTS_PATH


QUICK = dict(num_requests=24, num_adapters=8, prompt_len_range=(8, 16), output_len_range=(8, 8), passes=1)


# -- the engine alone ------------------------------------------------------------------------------------


def engine_config(cfg: OverheadConfig, model_dir: Path):
    """The engine settings the worker gets from the flags below (`worker_args`), built as main.py does."""
    from data_plane.engine.config import EngineConfig
    from data_plane.server.config import EngineSettings

    settings = EngineSettings(
        num_adapter_slots=cfg.num_adapter_slots,
        max_num_seqs=cfg.max_num_seqs,
        host_cache_bytes=cfg.host_cache_bytes,
    )
    values = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
    return EngineConfig(
        model_dir=model_dir,
        max_waiting=cfg.max_waiting,
        **{name: value for name, value in values.items() if value is not None},
    )


def worker_args(cfg: OverheadConfig) -> tuple[str, ...]:
    return (
        f"--num-adapter-slots={cfg.num_adapter_slots}",
        f"--max-num-seqs={cfg.max_num_seqs}",
        f"--max-waiting={cfg.max_waiting}",
        f"--host-cache-bytes={cfg.host_cache_bytes}",
        f"--stream-interval={cfg.stream_interval}",
        f"--engine-core={cfg.engine_core}",
    )


def add_requests(engine, requests, refs: dict) -> None:
    """Adds the trace's requests to `engine` at once, greedy, each on its adapter (`refs`: name ->
    AdapterRef), under request ids unique to this call."""
    from data_plane.engine.request import EngineRequest, SamplingOptions

    tag = uuid.uuid4().hex[:8]
    for r in requests:
        engine.add_request(
            EngineRequest(
                request_id=f"{tag}-{r.index}",
                prompt_token_ids=list(r.prompt_token_ids),
                sampling=SamplingOptions(temperature=0.0, max_tokens=r.max_tokens),
                adapters=(refs[r.adapter],) if r.adapter else (),
            )
        )


def run_engine(engine, requests: list[TraceRequest], refs: dict) -> tuple[int, float]:
    """Adds every request at once and steps until done; returns (tokens generated, seconds)."""
    started = time.perf_counter()
    add_requests(engine, requests, refs)
    tokens = 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.error is not None:
                raise RuntimeError(f"request {out.request_id} failed: {out.error}")
            tokens += len(out.new_token_ids)
    return tokens, time.perf_counter() - started


def run_engine_thread(engine, requests: list[TraceRequest], refs: dict) -> tuple[int, float]:
    """`run_engine` on a thread of its own named as the worker's engine thread: the worker steps its
    engine off the main thread, and torch's intra-op pool can behave very differently on the main thread
    of a loaded machine (seen here: the same steps 15x slower there at a load average of 12 on 2 CPUs)."""
    return on_engine_thread(run_engine, engine, requests, refs)


def on_engine_thread(fn, *args):
    """`fn(*args)` on a thread named as the worker's engine thread; its result, or its exception raised
    again here."""
    result: list = []

    def run() -> None:
        try:
            result.append(fn(*args))
        except BaseException as error:  # raised again on the caller's thread
            result.append(error)

    thread = threading.Thread(target=run, name="engine-loop")
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def warm_requests(names: list[str]) -> list[TraceRequest]:
    """benchmarks.run's warm-up: one 1-token request per adapter."""
    return [TraceRequest(i, 0.0, name, (100, 101, 102, 103), 1) for i, name in enumerate(names)]


# -- measuring processes and threads ---------------------------------------------------------------------


def _cpu_s(process: psutil.Process) -> float:
    with contextlib.suppress(psutil.Error):
        times = process.cpu_times()
        return times.user + times.system
    return 0.0


def _threads_cpu_s(process: psutil.Process) -> dict[int, float]:
    with contextlib.suppress(psutil.Error):
        return {t.id: t.user_time + t.system_time for t in process.threads()}
    return {}


class CpuMeter:
    """CPU seconds of this process, and of `up`'s processes (by role) and the worker's threads, over a
    block."""

    def __init__(self, up: psutil.Process | None = None, worker: psutil.Process | None = None) -> None:
        self.up, self.worker = up, worker
        self.seconds: dict[str, float] = {}

    def _snapshot(self) -> tuple[dict[str, float], dict[int, float]]:
        cpu = {"this process (load generator)": _cpu_s(psutil.Process())}
        if self.up is not None:
            others = 0.0
            for child in self.up.children(recursive=True):
                if self.worker is not None and child.pid == self.worker.pid:
                    continue
                with contextlib.suppress(psutil.Error):
                    if self.worker is not None and child.ppid() == self.worker.pid:
                        # The engine core (and multiprocessing's resource tracker, idle beside it).
                        key = "worker: engine core process"
                        cpu[key] = cpu.get(key, 0.0) + _cpu_s(child)
                        continue
                    cmdline = " ".join(child.cmdline())
                    if "control-plane" in cmdline or "control_plane" in cmdline:
                        cpu["control plane"] = cpu.get("control plane", 0.0) + _cpu_s(child)
                        continue
                others += _cpu_s(child)
            cpu["postgres, redis and the rest of `up`"] = others + _cpu_s(self.up)
        threads = _threads_cpu_s(self.worker) if self.worker is not None else {}
        return cpu, threads

    def __enter__(self) -> CpuMeter:
        self._before = self._snapshot()
        return self

    def __exit__(self, *exc) -> None:
        (cpu0, threads0), (cpu1, threads1) = self._before, self._snapshot()
        self.seconds = {k: v - cpu0.get(k, 0.0) for k, v in cpu1.items()}
        if self.worker is not None:
            main = self.worker.pid
            delta = {tid: s - threads0.get(tid, 0.0) for tid, s in threads1.items()}
            self.seconds["worker: event-loop thread"] = delta.pop(main, 0.0)
            # With --engine-core process the engine loop and torch's threads are in the core process.
            self.seconds["worker: other threads (engine loop, torch, gRPC core)"] = sum(delta.values())


def py_spy_binary() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


class Sampler:
    """`py-spy record` on a process while the block runs (raw collapsed stacks, one line per stack)."""

    def __init__(self, binary: str, pid: int, out: Path, gil: bool, rate_hz: int = SAMPLE_RATE_HZ) -> None:
        self.out, self.rate_hz = out, rate_hz
        mode = ["--gil"] if gil else ["--idle"]
        self.argv = [
            binary, "record", "--pid", str(pid), "--rate", str(rate_hz), "--format", "raw",
            "--threads", "--nonblocking", "-o", str(out), *mode,
        ]  # fmt: skip
        self.seconds = 0.0

    def __enter__(self) -> Sampler:
        self.process = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.3)  # attached before the pass starts
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.started
        self.process.send_signal(signal.SIGINT)  # py-spy writes its file and exits
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def stacks(self) -> list[tuple[str, list[str], int]]:
        """(thread label, frames root first, samples) per line; empty when py-spy failed."""
        if not self.out.exists():
            return []
        rows = []
        for line in self.out.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            thread, *frames = stack.split(";")
            rows.append((thread, frames, int(count)))
        return rows


def thread_name(label: str, main_pid: int) -> str:
    """py-spy's "thread (TID): NAME" as a readable name; the main thread is the event loop (or, in the
    engine-alone pass, the engine)."""
    head, _, name = label.partition(": ")
    tid = head.removeprefix("thread (").rstrip(")")
    if tid.isdigit() and int(tid) == main_pid:
        return "main thread"
    return name or head


def gil_shares(sampler: Sampler, main_pid: int) -> dict[str, float]:
    """Share of the wall time each thread held the GIL (samples / ticks), and their sum."""
    ticks = max(sampler.seconds * sampler.rate_hz, 1.0)
    held: Counter[str] = Counter()
    for thread, _, count in sampler.stacks():
        held[thread_name(thread, main_pid)] += count
    shares = {name: count / ticks for name, count in held.most_common()}
    shares["any thread (GIL busy)"] = sum(held.values()) / ticks
    return shares


def engine_busy_share(sampler: Sampler, main_pid: int) -> dict[str, float]:
    """The engine-loop thread's samples: inside LLMEngine.step, against waiting for work (its inbox)."""
    busy = idle = other = 0
    for thread, frames, count in sampler.stacks():
        if thread_name(thread, main_pid) != "engine-loop":
            continue
        # py-spy names a frame "Class.function (file.py:line)"
        if any("step (" in f and "llm_engine.py" in f for f in frames):
            busy += count
        elif any("_drain_inbox (" in f for f in frames):
            idle += count
        else:
            other += count
    total = max(busy + idle + other, 1)
    return {"in LLMEngine.step": busy / total, "waiting for work": idle / total, "other": other / total}


def self_frames(sampler: Sampler, limit: int = 15) -> list[tuple[str, float]]:
    """Innermost Python function of each sample (any thread), by share of the samples: where the CPU
    went (a C extension's time shows as the Python function that called it)."""
    counts: Counter[str] = Counter()
    for _, frames, count in sampler.stacks():
        if frames:
            counts[frames[-1].split(" (")[0]] += count
    total = max(sum(counts.values()), 1)
    return [(name, count / total) for name, count in counts.most_common(limit)]


def inclusive_frames(sampler: Sampler, limit: int = 15) -> list[tuple[str, float]]:
    """Functions on the stack of each sample (any thread; each counted once a sample), by share."""
    counts: Counter[str] = Counter()
    total = 0
    for _, frames, count in sampler.stacks():
        total += count
        for name in {f.split(" (")[0] for f in frames}:
            counts[name] += count
    return [(name, count / max(total, 1)) for name, count in counts.most_common(limit)]


def engine_core_process(worker: psutil.Process) -> psutil.Process | None:
    """The worker's engine core process (--engine-core process), or None (the loop is a thread)."""
    for child in worker.children():
        with contextlib.suppress(psutil.Error):
            cmdline = " ".join(child.cmdline())
            if "spawn_main" in cmdline:
                return child
    return None


def control_plane_process(up: psutil.Process) -> psutil.Process | None:
    for child in up.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "control-plane" in " ".join(child.cmdline()):
                return child
    return None


def top_frames(sampler: Sampler, main_pid: int, limit: int = 15) -> list[tuple[str, float]]:
    """What the main thread ran while it held the GIL, by share of those samples: each sample counts once
    for every function on its stack below the event loop's callback runner (`Handle._run`), or for its
    innermost function when it was outside a callback (polling, the loop itself)."""
    counts: Counter[str] = Counter()
    total = 0
    for thread, frames, count in sampler.stacks():
        if thread_name(thread, main_pid) != "main thread" or not frames:
            continue
        total += count
        names = [f.split(" (")[0] for f in frames]
        below = names[len(names) - names[::-1].index("Handle._run") :] if "Handle._run" in names else []
        for name in set(below) if below else {names[-1]}:
            counts[name] += count
    return [(name, count / max(total, 1)) for name, count in counts.most_common(limit)]


# -- the run ---------------------------------------------------------------------------------------------


def build_trace(cfg: OverheadConfig, vocab_size: int = TraceConfig.vocab_size) -> Trace:
    return generate_trace(
        TraceConfig(
            num_requests=cfg.num_requests,
            num_adapters=cfg.num_adapters,
            alpha=cfg.alpha,
            prompt_len_range=cfg.prompt_len_range,
            output_len_range=cfg.output_len_range,
            seed=cfg.seed,
            vocab_size=vocab_size,
        )
    )


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_args(argv)
    from data_plane.engine.llm_engine import LLMEngine
    from data_plane.engine.request import AdapterRef
    from openlora.artifact import digest_dir

    shape = fixtures.LLAMA_50M
    model_dir = fixtures.ensure_model(shape)
    adapter_dirs = fixtures.ensure_adapters(cfg.num_adapters, shape, fixtures.AdapterSpec())
    trace = build_trace(cfg)
    names = trace.adapters_used
    dirs = {adapter_name(i): d for i, d in enumerate(adapter_dirs)}
    refs = {name: AdapterRef(key=digest_dir(dirs[name]), path=dirs[name]) for name in names}
    spy = py_spy_binary() if cfg.py_spy else None
    print(
        f"trace: {len(trace.requests)} requests over {len(names)} adapters, {trace.total_output_tokens} "
        f"tokens; {cfg.passes} passes each; worker --engine-core {cfg.engine_core}; py-spy: {spy or 'off'}"
    )
    results: dict = {"config": _jsonable(dataclasses.asdict(cfg)), "engine": [], "worker": []}
    work_dir = Path(tempfile.mkdtemp(prefix="openlora-overhead-"))
    try:
        engine = LLMEngine(engine_config(cfg, model_dir))
        run_engine_thread(engine, warm_requests(names), refs)
        system_config = SystemConfig(
            model_dir=model_dir,
            state_dir=work_dir / "system",
            database_url=cfg.database_url,
            redis_url=cfg.redis_url,
            worker_args=worker_args(cfg),
        )
        with start_system(system_config) as system:
            register_adapters(system, [(name, dirs[name]) for name in names], public=True)
            run_load(warm_requests(names), system.inference_target, system.api_key, run_tag=_tag("warm"))
            worker = system.worker_process()
            up = psutil.Process(system.process.pid)
            for i in range(cfg.passes):
                results["engine"].append(
                    engine_pass(engine, trace, refs, spy, work_dir / f"engine-{i}", cfg.sample_rate_hz)
                )
                results["worker"].append(
                    worker_pass(system, trace, up, worker, spy, work_dir / f"worker-{i}", cfg.sample_rate_hz)
                )
                print(pass_line(i, results))
        engine.shutdown()
        del engine
        gc.collect()
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    report = summarize(results)
    print(report)
    cfg.results_path.parent.mkdir(parents=True, exist_ok=True)
    cfg.results_path.write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {cfg.results_path}")
    return 0


def engine_pass(
    engine, trace: Trace, refs: dict, spy: str | None, out: Path, rate_hz: int = SAMPLE_RATE_HZ
) -> dict:
    out.mkdir(parents=True)
    meter = CpuMeter()
    with contextlib.ExitStack() as stack:
        gil = (
            stack.enter_context(Sampler(spy, os.getpid(), out / "gil.txt", gil=True, rate_hz=rate_hz))
            if spy
            else None
        )
        stack.enter_context(meter)
        tokens, seconds = run_engine_thread(engine, list(trace.requests), refs)
    result = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "cpu_s": meter.seconds}
    if gil is not None:
        result["gil_share"] = gil_shares(gil, os.getpid())
    return result


def worker_pass(
    system, trace: Trace, up, worker, spy: str | None, out: Path, rate_hz: int = SAMPLE_RATE_HZ
) -> dict:
    out.mkdir(parents=True)
    meter = CpuMeter(up, worker)
    with contextlib.ExitStack() as stack:
        gil = idle = control = None
        # The engine loop's process: the worker's own, or its engine core.
        loop_pid = core.pid if (core := engine_core_process(worker)) is not None else worker.pid
        if spy:
            gil = stack.enter_context(Sampler(spy, worker.pid, out / "gil.txt", gil=True, rate_hz=rate_hz))
            idle = stack.enter_context(Sampler(spy, loop_pid, out / "idle.txt", gil=False, rate_hz=rate_hz))
            if (cp := control_plane_process(up)) is not None:
                control = stack.enter_context(
                    Sampler(spy, cp.pid, out / "control-plane.txt", gil=True, rate_hz=rate_hz)
                )
        stack.enter_context(meter)
        load = run_load(trace.requests, system.inference_target, system.api_key, run_tag=_tag("run"))
    summary = load["summary"]
    result = {
        "tokens": summary["completion_tokens"],
        "seconds": summary["duration_s"],
        "tokens_per_s": summary["tokens_per_s"],
        "errors": summary["errors"],
        "summary": summary,
        "cpu_s": meter.seconds,
    }
    if gil is not None:
        result["gil_share"] = gil_shares(gil, worker.pid)
        result["event_loop_top_frames"] = top_frames(gil, worker.pid)
        result["event_loop_self_frames"] = self_frames(_only_thread(gil, worker.pid, "main thread"))
    if control is not None:
        result["control_plane_frames"] = inclusive_frames(control)
        result["control_plane_self_frames"] = self_frames(control)
        result["engine_loop"] = engine_busy_share(idle, loop_pid)
    return result


class _Rows:
    """A sampler's stacks, filtered: what `self_frames` and `inclusive_frames` read."""

    def __init__(self, rows: list[tuple[str, list[str], int]]) -> None:
        self._rows = rows

    def stacks(self) -> list[tuple[str, list[str], int]]:
        return self._rows


def _only_thread(sampler: Sampler, main_pid: int, name: str) -> _Rows:
    return _Rows([row for row in sampler.stacks() if thread_name(row[0], main_pid) == name])


def pass_line(i: int, results: dict) -> str:
    e, w = results["engine"][i], results["worker"][i]
    return (
        f"pass {i + 1}: engine alone {e['tokens_per_s']:.1f} tokens/s ({e['tokens']} in {e['seconds']:.2f} s), "
        f"worker {w['tokens_per_s']:.1f} tokens/s ({w['tokens']} in {w['seconds']:.2f} s, {w['errors']} errors), "
        f"ratio {w['tokens_per_s'] / e['tokens_per_s']:.3f}"
    )


def summarize(results: dict) -> str:
    best_e = max(results["engine"], key=lambda r: r["tokens_per_s"])
    best_w = max(results["worker"], key=lambda r: r["tokens_per_s"])
    ratio = best_w["tokens_per_s"] / best_e["tokens_per_s"]
    # The worker's tokens/s is over the requests that succeeded (the time a failed one leaves goes to the
    # others), while the engine alone raises on any failure: a failed request in any pass misses the target.
    failed = sum(r["errors"] for r in results["worker"])
    results["best"] = {
        "engine": best_e["tokens_per_s"],
        "worker": best_w["tokens_per_s"],
        "ratio": ratio,
        "worker_failed_requests": failed,
    }
    # Each worker pass against the engine pass just before it: the two arms side by side in time, so the
    # machine's drift between passes (often larger than the effect measured) falls on both.
    per_pass = median_summary(
        [
            w["tokens_per_s"] / e["tokens_per_s"]
            for e, w in zip(results["engine"], results["worker"], strict=True)
        ]
    )
    results["per_pass_ratio"] = per_pass
    interval = results.get("config", {}).get("stream_interval", 1)
    verdict = "met" if ratio >= TARGET_RATIO and failed == 0 else "NOT met"
    if interval != 1:  # the target is read at the worker's default
        verdict = f"not read at --stream-interval {interval}; the target is read at 1"
    lines = [
        "",
        f"engine alone {best_e['tokens_per_s']:.1f} tokens/s, worker {best_w['tokens_per_s']:.1f} tokens/s: "
        f"ratio {ratio:.3f} (best pass of each; target >= {TARGET_RATIO}: {verdict})"
        + (f"; {failed} worker requests failed" if failed else ""),
        f"per pass (each worker pass / the engine pass before it, {len(results['worker'])} passes): median "
        f"{per_pass['median']:.3f}, range {per_pass['min']:.3f}-{per_pass['max']:.3f}, 95% bootstrap interval "
        f"of the median {per_pass['ci95'][0]:.3f}-{per_pass['ci95'][1]:.3f}",
        f"worker pass: {format_summary(best_w['summary']).strip()}",
        "",
        f"CPU seconds during the best passes (engine alone {best_e['seconds']:.2f} s wall, "
        f"worker {best_w['seconds']:.2f} s wall; the machine has {os.cpu_count()} CPUs):",
        f"  {'engine alone: this process':<58} {best_e['cpu_s']['this process (load generator)']:7.2f}",
    ]
    for name, seconds in sorted(best_w["cpu_s"].items()):
        lines.append(f"  {'worker run: ' + name:<58} {seconds:7.2f}")
    if "gil_share" in best_w:
        lines += ["", "Share of wall time each thread held the GIL (py-spy --gil):"]
        for name, share in best_e.get("gil_share", {}).items():
            lines.append(f"  {'engine alone: ' + name:<58} {share:7.1%}")
        for name, share in best_w["gil_share"].items():
            lines.append(f"  {'worker: ' + name:<58} {share:7.1%}")
        # The engine thread can wait for the GIL only while another thread holds it: the event loop's share
        # bounds what sharing one interpreter with it costs the engine (issue 13 asks below 5%).
        loop_share = best_w["gil_share"].get("main thread", 0.0)
        results["best"]["event_loop_gil_share"] = loop_share
        lines.append(f"  {'bound on the engine loop GIL wait for the event loop':<58} {loop_share:7.1%}")
        lines += ["", "Worker's engine-loop thread (py-spy --idle):"]
        for name, share in best_w["engine_loop"].items():
            lines.append(f"  {name:<58} {share:7.1%}")
        # Time the worker's engine spent stepping the trace against the engine alone's whole pass: above 1
        # by what contention (CPU with the other processes, the GIL with the event loop) slowed its steps;
        # the rest of the worker's extra time is the engine waiting for requests.
        stepping_s = best_w["engine_loop"]["in LLMEngine.step"] * best_w["seconds"]
        results["best"]["step_time_ratio"] = stepping_s / best_e["seconds"]
        lines.append(
            f"  {'time in step, worker / engine alone':<58} {stepping_s / best_e['seconds']:7.3f}"
            f"  ({stepping_s:.2f} s / {best_e['seconds']:.2f} s)"
        )
        lines += [
            "",
            "Worker's event-loop thread: functions on its stack while it held the GIL (share of those samples):",
        ]
        for frame, share in best_w["event_loop_top_frames"]:
            lines.append(f"  {share:6.1%}  {frame}")
        lines += ["", "Worker's event-loop thread: innermost Python function while it held the GIL:"]
        for frame, share in best_w.get("event_loop_self_frames", []):
            lines.append(f"  {share:6.1%}  {frame}")
    if "control_plane_frames" in best_w:
        lines += ["", "Control plane while it held the GIL: functions on the stack (share of samples):"]
        for frame, share in best_w["control_plane_frames"]:
            lines.append(f"  {share:6.1%}  {frame}")
        lines += ["", "Control plane: innermost Python function:"]
        for frame, share in best_w["control_plane_self_frames"]:
            lines.append(f"  {share:6.1%}  {frame}")
    return "\n".join(lines)


def _tag(kind: str) -> str:
    return f"overhead-{kind}-{uuid.uuid4().hex[:8]}"


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items() if k not in ("database_url", "redis_url")}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return value.name
    return value


def config_from_args(argv: list[str] | None) -> OverheadConfig:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 24 requests over 8 adapters, 1 pass")
    parser.add_argument("--passes", type=int, help="timed passes of each side (default 2)")
    parser.add_argument("--requests", type=int, help="requests in the trace (default 256)")
    parser.add_argument("--output-len", type=int, help="tokens generated per request (default 16)")
    parser.add_argument("--no-py-spy", action="store_true", help="no sampling, CPU seconds only")
    parser.add_argument(
        "--sample-rate-hz",
        type=int,
        default=SAMPLE_RATE_HZ,
        help=f"py-spy samples a second (default {SAMPLE_RATE_HZ}; more gives finer profiles and takes more CPU)",
    )
    parser.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        help="the worker's --stream-interval (default 1, the worker's own default, at which issue 13's "
        "target is read)",
    )
    parser.add_argument(
        "--engine-core",
        choices=("process", "thread"),
        default="process",
        help="the worker's --engine-core (default process, the worker's own default)",
    )
    parser.add_argument("--database-url", default=None, help="default: embedded PostgreSQL")
    parser.add_argument("--redis-url", default=None, help="default: embedded Redis")
    parser.add_argument(
        "--out", type=Path, default=None, help="results JSON (default results/serving_overhead*.json)"
    )
    args = parser.parse_args(argv)
    cfg = OverheadConfig(**QUICK) if args.quick else OverheadConfig()
    overrides: dict = {
        "py_spy": not args.no_py_spy,
        "database_url": args.database_url,
        "redis_url": args.redis_url,
        "results_path": args.out or (QUICK_RESULTS_PATH if args.quick else RESULTS_PATH),
    }
    if args.stream_interval < 1:
        parser.error("--stream-interval must be >= 1")
    overrides["stream_interval"] = args.stream_interval
    overrides["engine_core"] = args.engine_core
    if args.sample_rate_hz < 1:
        parser.error("--sample-rate-hz must be >= 1")
    overrides["sample_rate_hz"] = args.sample_rate_hz
    if args.passes is not None:
        if args.passes < 1:
            parser.error("--passes must be >= 1")
        overrides["passes"] = args.passes
    if args.requests is not None:
        overrides["num_requests"] = args.requests
    if args.output_len is not None:
        overrides["output_len_range"] = (args.output_len, args.output_len)
    return dataclasses.replace(cfg, **overrides)


if __name__ == "__main__":
    sys.exit(main())
