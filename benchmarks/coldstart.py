"""Cold start of the long tail: is an adapter called once an "hour" still fast on its call?

Run as a user would run it: each pass starts `openlora up` (the real command, as a subprocess) with
documented flags only (the worker's through `--worker-arg`, the predictor's own flags), on a fresh database
and state dir, uploads the adapters, and replays the trace (`benchmarks/coldstart_trace.py`): power-law
traffic over a few popular adapters plus a long tail whose adapters are each called about once per
compressed hour. The worker's device slots cannot hold every adapter; its host-memory budget holds the
popular adapters and `host_share` (70%) of the long tail. Four passes in one invocation: two long tails,
periodic (hourly with a jitter of minutes, scaled) and memoryless (Poisson, one call per hour on average),
each with hints on (the predictor every `--predictor-interval-s`) and off (`--predictor-interval-s 0`).

Reported per pass over the measured hours: popular and long-tail TTFT p50/p99 (client clock, from the
scheduled arrival), the tier each request was served from (`timing.cache_tier`), the long tail's warm
share (device or host) and its warm calls' TTFT, the first call ever of an adapter, the decode
inter-token latency of requests while an adapter load was in flight (loads requests waited for and the
hint-driven prefetches, from the worker's load log) against while none was, the worker's wasted
prefetches (`openlora_prefetch_wasted_total` / `openlora_prefetch_total`, "n/a" on a worker without
them), TTFT and adapter-load time per popularity decile, and why each measured long-tail call served
from disk or remote was cold (`coldstart_trace.why_cold`, from the hint stream and the worker's debug log:
no hint, hint taken late, prefetch skipped for room, declined or evicted from host memory, left its slot
with no host copy, prefetch still in flight, or unexplained).

    python -m benchmarks.coldstart            # full run (4 passes; about 7 minutes on 2 CPU cores)
    python -m benchmarks.coldstart --quick    # smoke run (2 passes: periodic hints on, Poisson off)
    python -m benchmarks.coldstart --time-scale 2.5 --tail poisson --measured-hours 8
                                              # the Poisson passes, longer, on a 2.5x slower clock
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from benchmarks import fixtures
from benchmarks.coldstart_report import (
    DECILE_HEADER,
    TABLE_HEADER,
    decile_rows,
    pass_label,
    pass_lines,
    results_section,
    table_rows,
    target_lines,
)
from benchmarks.coldstart_trace import (
    PERIODIC,
    POISSON,
    TAILS,
    WHY_COLD,
    ColdStartRequest,
    ColdStartTraceConfig,
    analyze,
    cold_calls,
    generate_coldstart_trace,
    targets,
    why_cold,
)
from benchmarks.load import replay, summarize
from benchmarks.report import format_table, update_results_md
from benchmarks.run import jsonable, machine_info, utc_now
from benchmarks.trace import adapter_name

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
MARKER = "benchmarks.coldstart"
READY_TIMEOUT_S = 300.0
TENANT = "coldstart"


@dataclass(frozen=True)
class ColdStartConfig:
    trace: ColdStartTraceConfig = field(default_factory=ColdStartTraceConfig)  # `tail` set per pass
    passes: tuple[tuple[str, bool], ...] = tuple((tail, on) for tail in TAILS for on in (True, False))
    num_adapter_slots: int = 8
    # The host budget holds this share of the long tail besides the popular adapters (which also live in
    # host memory when the slots churn).
    host_share: float = 0.7
    max_num_seqs: int = 32
    # The predictor's flags on the hints-ON passes, fitted to the compressed clock: a pass every half
    # second, prewarm 2 s (a quarter of an 8 s "hour") before a predicted call, a rate window of 30 s,
    # and adapters called 0.2 times a second or more (the popular ones) are hot and get no hints.
    predictor_flags: tuple[tuple[str, str], ...] = (
        ("--predictor-interval-s", "0.5"),
        ("--predictor-lead-s", "2"),
        ("--predictor-rate-window-s", "30"),
        ("--predictor-hot-rate-per-s", "0.2"),
    )
    device: str = "cpu"
    database_url: str | None = None  # None: embedded PostgreSQL (a fresh database per pass either way)
    redis_url: str | None = None  # None: embedded Redis
    results_dir: Path = RESULTS_DIR
    update_results_md: bool = True
    quick: bool = False
    command: str = "python -m benchmarks.coldstart"

    @property
    def num_host_adapters(self) -> int:
        return self.trace.num_popular + round(self.host_share * self.trace.num_long_tail)


QUICK_TRACE = dict(
    num_popular=4,
    popular_rate_per_s=1.0,
    num_long_tail=8,
    hour_s=3.0,
    num_history_hours=4,
    num_measured_hours=1,
    output_len_range=(8, 8),
    prompt_len_range=(8, 16),
)
QUICK_PASSES = ((PERIODIC, True), (POISSON, False))
# A 3 s "hour": prewarm 1 s ahead of a predicted call instead of 2.
QUICK_PREDICTOR_FLAGS = tuple(
    (flag, "1" if flag == "--predictor-lead-s" else value) for flag, value in ColdStartConfig.predictor_flags
)


# --------------------------------------------------------------------------------- the system under test


@dataclass
class Pass:
    """One `openlora up` serving one pass of the trace."""

    inference_target: str
    admin_target: str
    api_key: str
    metrics_url: str
    worker_log: Path
    key_of: dict[str, str]  # adapter name -> the first 12 hex digits of its sha256 (the worker log's key)


def _database_url(server_url: str, name: str) -> str:
    parts = urlsplit(server_url)
    return urlunsplit(parts._replace(path="/" + name))


@contextlib.contextmanager
def fresh_database(server_url: str, name: str) -> Iterator[str]:
    """A new empty database on the server of `server_url`, dropped afterwards."""
    import psycopg

    admin_url = _database_url(server_url, "postgres")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _database_url(server_url, name)
    finally:
        with contextlib.suppress(Exception), psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def host_bytes_per_adapter(adapter_dir: Path) -> int:
    """Bytes of one adapter's packed host copy under the CPU engine's float32, as the worker counts them
    (float16 files stay float16 in host memory)."""
    import torch

    from data_plane.engine.adapter_loader import host_copy_bytes
    from data_plane.engine.request import AdapterRef

    size = host_copy_bytes((AdapterRef(key="bench", path=adapter_dir, weight=1.0),), torch.float32)
    if size is None:
        raise ValueError(f"cannot read the safetensors header of {adapter_dir}")
    return size


def host_cache_bytes(cfg: ColdStartConfig, adapter_dir: Path) -> int:
    """The worker's host-memory budget: `num_host_adapters` packed adapters and 1 MiB of slack."""
    return cfg.num_host_adapters * host_bytes_per_adapter(adapter_dir) + (1 << 20)


def up_argv(
    cfg: ColdStartConfig,
    hints_on: bool,
    database_url: str,
    redis_url: str,
    model_dir: Path,
    state_dir: Path,
    host_budget_bytes: int,
    metrics_port: int,
) -> list[str]:
    """The `openlora up` command line of one pass (documented flags only)."""
    worker_flags = {
        "--num-adapter-slots": cfg.num_adapter_slots,
        "--host-cache-bytes": host_budget_bytes,
        "--max-num-seqs": cfg.max_num_seqs,
        "--metrics-port": metrics_port,
        "--log-level": "DEBUG",  # one line per adapter load, by cause and source tier
    }
    predictor = cfg.predictor_flags if hints_on else (("--predictor-interval-s", "0"),)
    argv = [
        sys.executable, "-m", "openlora.cli", "up",
        "--state-dir", str(state_dir), "--model", str(model_dir),
        "--database-url", database_url, "--redis-url", redis_url,
        "--port", "0", "--admin-port", "0", "--http-port", "0",
        "--context", str(state_dir / "context.json"), "--tenant", TENANT,
        "--device", cfg.device, "--drain-grace-s", "5",
        *(f"--worker-arg={flag}={value}" for flag, value in worker_flags.items()),
        *(f"{flag}={value}" for flag, value in predictor),
    ]  # fmt: skip
    return argv


READY_LINE = re.compile(r"^ready inference=(\S+) admin=(\S+) openai=\S+ key=(\S+)$", re.MULTILINE)


def _wait_ready(process: subprocess.Popen, out_path: Path, log_path: Path) -> tuple[str, str, str]:
    """(inference target, admin target, api key) from up's `ready` line."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        match = READY_LINE.search(out_path.read_text(errors="replace"))
        if match:
            return match.group(1), match.group(2), match.group(3)
        if process.poll() is not None:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
            raise RuntimeError(f"openlora up exited with {process.returncode}:\n{tail}")
        time.sleep(0.2)
    raise TimeoutError(f"openlora up was not ready within {READY_TIMEOUT_S:.0f}s")


@contextlib.contextmanager
def start_up(
    cfg: ColdStartConfig, hints_on: bool, database_url: str, redis_url: str, model_dir: Path, state_dir: Path
) -> Iterator[Pass]:
    """`openlora up` for one pass, the adapters uploaded to its tenant; stopped (SIGTERM) at the end."""
    from openlora.admin_client import AdminClient
    from openlora.embedded import free_port

    state_dir.mkdir(parents=True, exist_ok=True)
    adapter_dirs = fixtures.ensure_adapters(cfg.trace.num_adapters, fixtures.LLAMA_50M)
    metrics_port = free_port("127.0.0.1")
    budget = host_cache_bytes(cfg, adapter_dirs[0])
    argv = up_argv(cfg, hints_on, database_url, redis_url, model_dir, state_dir, budget, metrics_port)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENLORA_")}
    out_path, log_path = state_dir / "up.out", state_dir / "up.log"
    with open(out_path, "wb") as out, open(log_path, "wb") as log:
        process = subprocess.Popen(
            argv, env=env, stdout=out, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
        )
    try:
        inference_target, admin_target, api_key = _wait_ready(process, out_path, log_path)
        key_of = {}
        with AdminClient(admin_target, api_key, timeout_s=120) as admin:
            for index, directory in enumerate(adapter_dirs):
                uploaded = admin.upload_adapter(directory, adapter_name(index), model_dir.name)
                key_of[adapter_name(index)] = uploaded.adapter.sha256[:12]
        yield Pass(
            inference_target,
            admin_target,
            api_key,
            f"http://127.0.0.1:{metrics_port}/metrics",
            state_dir / "logs" / "worker.log",
            key_of,
        )
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# ------------------------------------------------------------------------------- the worker's own account

LOAD_EVENT = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ \S+: adapter load cause=(\w+) tier=(\w+) to=(\w+) "
    r"key=\S+ read_ms=([\d.]+) copy_ms=([\d.]+)",
    re.MULTILINE,
)


def worker_loads(log_text: str) -> list[dict]:
    """The worker's finished adapter loads (its debug log): cause, source tier, destination, read + copy
    ms on the loader thread, and the wall-clock time (Unix seconds) the engine took the result."""
    loads = []
    for match in LOAD_EVENT.finditer(log_text):
        stamp, cause, tier, to, read_ms, copy_ms = match.groups()
        loads.append({
            "at_s": datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp(),
            "cause": cause, "tier": tier, "to": to, "ms": float(read_ms) + float(copy_ms),
        })  # fmt: skip
    return loads


def load_event_counts(loads: Sequence[dict]) -> dict[str, dict]:
    """Loads by "cause/source->destination": count and duration percentiles."""
    from benchmarks.load import percentiles

    by_event: dict[str, list[float]] = {}
    for load in loads:
        by_event.setdefault(f"{load['cause']}/{load['tier']}->{load['to']}", []).append(load["ms"])
    return {event: {"count": len(ms), "ms": percentiles(ms)} for event, ms in sorted(by_event.items())}


def prefetch_windows_s(loads: Sequence[dict], t0_wall_s: float) -> list[tuple[float, float]]:
    """(start, end) on the replay's clock of each hint-driven prefetch: it ended when the engine took it
    (the log line, at most a step after the copy) and lasted its read + copy time."""
    return [
        (load["at_s"] - t0_wall_s - load["ms"] / 1000.0, load["at_s"] - t0_wall_s)
        for load in loads
        if load["cause"] == "prefetch"
    ]


WORKER_EVENT = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ \S+: (?:"
    r"(?P<hint>prewarm hint) key=(?P<k1>\w+)"
    r"|adapter prefetch (?P<started>started) to=\w+ key=(?P<k2>\w+)"
    r"|adapter prefetch skipped reason=(?P<reason>\w+) key=(?P<k3>\w+)"
    r"|adapter host (?P<host>declined|evicted) key=(?P<k4>\w+)"
    r"|adapter (?P<left>left its slot) without a host copy key=(?P<k5>\w+)"
    r"|adapter load cause=(?P<prefetch>prefetch) tier=\w+ to=\w+ key=(?P<k6>\w+))",
    re.MULTILINE,
)


def worker_events(log_text: str) -> list[dict]:
    """The worker's hint and tier events from its debug log, for `why_cold`: {"at_s" (Unix seconds),
    "event", "key"}."""
    events = []
    for match in WORKER_EVENT.finditer(log_text):
        if match["hint"]:
            event = "hint"
        elif match["started"]:
            event = "prefetch_started"
        elif match["reason"]:
            event = f"skipped_{match['reason']}"
        elif match["host"]:
            event = f"host_{match['host']}"
        elif match["left"]:
            event = "left_slot"
        else:
            event = "prefetch_loaded"
        key = next(k for k in (match[f"k{i}"] for i in range(1, 7)) if k)
        at_s = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        events.append({"at_s": at_s, "event": event, "key": key})
    return events


PREFETCH_SAMPLE = re.compile(
    r"^(openlora_prefetch(?:_wasted)?_total)(?:\{[^}]*\})? ([0-9.eE+-]+)$", re.MULTILINE
)


def prefetch_counts(metrics_text: str) -> dict | None:
    """{"total", "wasted", "wasted_share"} summed over tiers from the worker's Prometheus text; None
    when the worker does not export both counters."""
    sums: dict[str, float] = {}
    for name, value in PREFETCH_SAMPLE.findall(metrics_text):
        sums[name] = sums.get(name, 0.0) + float(value)
    if "openlora_prefetch_total" not in sums or "openlora_prefetch_wasted_total" not in sums:
        return None
    total, wasted = sums["openlora_prefetch_total"], sums["openlora_prefetch_wasted_total"]
    return {"total": int(total), "wasted": int(wasted), "wasted_share": wasted / total if total else 0.0}


def _scrape(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode(errors="replace")
    except OSError:
        return ""


def _stream_length(redis_url: str) -> int:
    import redis

    from openlora.hints import HINTS_STREAM

    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.xlen(HINTS_STREAM))
    finally:
        client.close()


def _last_stream_id(redis_url: str) -> str:
    import redis

    from openlora.hints import HINTS_STREAM

    client = redis.Redis.from_url(redis_url)
    try:
        newest = client.xrevrange(HINTS_STREAM, count=1)
        return newest[0][0].decode() if newest else "0-0"
    finally:
        client.close()


def prewarm_hints_since(redis_url: str, after_id: str) -> list[dict]:
    """The prewarm hints published after stream entry `after_id`: {"key" (sha256 prefix), "issued_at",
    "deadline_at"}."""
    import redis

    from openlora.hints import HINTS_STREAM, Hint

    client = redis.Redis.from_url(redis_url)
    try:
        entries = client.xrange(HINTS_STREAM, min=f"({after_id}")
    finally:
        client.close()
    hints = []
    for _id, fields in entries:
        hint = Hint.from_fields(fields)
        if hint.kind == "prewarm":
            hints.append(
                {"key": hint.sha256[:12], "issued_at": hint.issued_at, "deadline_at": hint.deadline_at}
            )
    return hints


# ---------------------------------------------------------------------------------------------- a pass


async def _replay(requests: Sequence[ColdStartRequest], p: Pass, tag: str) -> tuple[list[dict], float, dict]:
    """(records, the replay's t0 as Unix seconds, summary)."""
    records, t0, finished = await replay(
        [r.request for r in requests], p.inference_target, p.api_key, run_tag=tag
    )
    wall_minus_perf_s = time.time() - time.perf_counter()
    return [asdict(r) for r in records], t0 + wall_minus_perf_s, summarize(records, t0, finished)


def run_pass(
    cfg: ColdStartConfig,
    trace: ColdStartTraceConfig,
    hints_on: bool,
    urls: tuple[str, str],
    model_dir: Path,
    state_root: Path,
) -> dict:
    label = pass_label(trace.tail, hints_on)
    requests = generate_coldstart_trace(trace)
    database_server_url, redis_url = urls
    slug = f"{trace.tail}-{'on' if hints_on else 'off'}"
    started = time.perf_counter()
    with (
        fresh_database(
            database_server_url, f"coldstart_{slug.replace('-', '_')}_{secrets.token_hex(4)}"
        ) as db,
        start_up(cfg, hints_on, db, redis_url, model_dir, state_root / slug) as p,
    ):
        ready_s = time.perf_counter() - started
        print(
            f"{label}: up in {ready_s:.0f} s; replaying {len(requests)} requests over {trace.duration_s:.0f} s",
            flush=True,
        )
        hints_before, first_id = _stream_length(redis_url), _last_stream_id(redis_url)
        records, t0_wall_s, summary = asyncio.run(_replay(requests, p, f"cold-{slug}-{secrets.token_hex(3)}"))
        num_hints = _stream_length(redis_url) - hints_before
        hints = prewarm_hints_since(redis_url, first_id)
        metrics_text = _scrape(p.metrics_url)
        prefetches = prefetch_counts(metrics_text)
        log_text = p.worker_log.read_text(errors="replace")
        loads = worker_loads(log_text)
    windows = prefetch_windows_s(loads, t0_wall_s)
    figures = analyze(requests, records, windows)
    reasons = why_cold(cold_calls(requests, records, t0_wall_s, p.key_of), hints, worker_events(log_text))
    figures["why_cold"] = {reason: reasons.count(reason) for reason in WHY_COLD if reason in reasons}
    figures.update(
        prefetch_windows_s=[(round(a, 3), round(b, 3)) for a, b in windows],
        metrics_scraped=bool(metrics_text),
        tail=trace.tail,
        hints_on=hints_on,
        hints_published=num_hints,
        hints_per_min=num_hints / (summary["duration_s"] / 60.0),
        worker_loads=load_event_counts(loads),
        prefetches=prefetches,
        startup_s=ready_s,
        replay_s=summary["duration_s"],
        errors_by_code=summary["errors_by_code"],
    )
    return {"figures": figures, "records": records}


# ---------------------------------------------------------------------------------------------- main


@contextlib.contextmanager
def backing_services(cfg: ColdStartConfig, state_root: Path) -> Iterator[tuple[str, str]]:
    """(Postgres server URL, Redis URL): the configured ones, else embedded servers for this run."""
    with contextlib.ExitStack() as stack:
        database_url, redis_url = cfg.database_url, cfg.redis_url
        if not database_url:
            from openlora.embedded import EmbeddedPostgres

            database_url = stack.enter_context(EmbeddedPostgres(state_root / "postgres"))
        if not redis_url:
            from openlora.embedded import EmbeddedRedis

            redis_url = stack.enter_context(EmbeddedRedis(state_root / "redis"))
        yield database_url, redis_url


def run(cfg: ColdStartConfig) -> dict:
    started = time.perf_counter()
    machine = machine_info()
    print(
        f"machine: {machine['nproc']} CPUs ({machine['cpu_model']}), {machine['memory_gib']} GiB", flush=True
    )
    model_dir = fixtures.ensure_model(fixtures.LLAMA_50M)
    adapter_dirs = fixtures.ensure_adapters(cfg.trace.num_adapters, fixtures.LLAMA_50M)
    results: dict = {
        "config": jsonable(asdict(cfg)),
        "machine": machine,
        "started_at": utc_now(),
        "model": f"{fixtures.LLAMA_50M.name} ({fixtures.LLAMA_50M.num_parameters / 1e6:.1f}M parameters, float32)",
        "num_host_adapters": cfg.num_host_adapters,
        "host_cache_bytes": host_cache_bytes(cfg, adapter_dirs[0]),
        "passes": {},
    }
    records: dict[str, list] = {}
    state_root = Path(tempfile.mkdtemp(prefix="openlora-coldstart-"))
    try:
        with backing_services(cfg, state_root) as urls:
            for tail, hints_on in cfg.passes:
                out = run_pass(cfg, replace(cfg.trace, tail=tail), hints_on, urls, model_dir, state_root)
                label = pass_label(tail, hints_on)
                results["passes"][label], records[label] = out["figures"], out["records"]
    except (Exception, KeyboardInterrupt) as error:
        results["incomplete"] = f"{type(error).__name__}: {error}"
        print(f"run stopped early: {results['incomplete']}", file=sys.stderr)
    finally:
        import shutil

        shutil.rmtree(state_root, ignore_errors=True)
    host_share = round(cfg.host_share * cfg.trace.num_long_tail) / cfg.trace.num_long_tail
    for key, hints_on in (("targets", True), ("targets_hints_off", False)):
        for tail in TAILS:
            figures = results["passes"].get(pass_label(tail, hints_on))
            if figures is not None:
                checked = targets(figures, tail, host_share, figures.get("prefetches"))
                results.setdefault(key, {})[tail] = checked
    results["elapsed_s"] = time.perf_counter() - started
    table = format_table(TABLE_HEADER, table_rows(results["passes"]))
    deciles = format_table(DECILE_HEADER, decile_rows(results["passes"]))
    print(table, deciles, *target_lines(results), sep="\n")
    for label, figures in results["passes"].items():
        print(*pass_lines(label, figures), sep="\n")
    cfg.results_dir.mkdir(parents=True, exist_ok=True)
    name = "coldstart-quick" if cfg.quick else "coldstart"
    (cfg.results_dir / f"{name}.json").write_text(json.dumps(jsonable(results), indent=2))
    (cfg.results_dir / f"{name}-records.json").write_text(json.dumps(records))
    if cfg.update_results_md and "incomplete" not in results:
        update_results_md(RESULTS_MD, results_section(results, table, deciles), MARKER)
    print(f"wrote {cfg.results_dir / f'{name}.json'} ({results['elapsed_s']:.0f} s)")
    return results


# Predictor flags measured in seconds (stretched by `time_scaled`) and in calls per second (compressed by it).
_SECONDS_FLAGS = ("--predictor-interval-s", "--predictor-lead-s", "--predictor-rate-window-s")
_RATE_FLAGS = ("--predictor-hot-rate-per-s",)


def time_scaled(cfg: ColdStartConfig, factor: float) -> ColdStartConfig:
    """The same experiment on a clock `factor` times slower: every arrival rate divided by `factor` and
    every duration (the compressed hour, the predictor's interval, lead and rate window) multiplied by it.
    Each request's work is unchanged, so a CPU `factor` times slower than the one the trace was set on sees
    the same utilisation and the same number of steps per hour."""
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"time scale must be a finite number > 0, got {factor!r}")

    def flag(name: str, value: str) -> tuple[str, str]:
        if name in _SECONDS_FLAGS:
            return name, f"{float(value) * factor:g}"
        if name in _RATE_FLAGS:
            return name, f"{float(value) / factor:g}"
        return name, value

    trace = replace(
        cfg.trace, hour_s=cfg.trace.hour_s * factor, popular_rate_per_s=cfg.trace.popular_rate_per_s / factor
    )
    return replace(cfg, trace=trace, predictor_flags=tuple(flag(n, v) for n, v in cfg.predictor_flags))


def config_from_args(argv: list[str]) -> ColdStartConfig:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 2 short passes, RESULTS.md untouched"
    )
    parser.add_argument("--database-url", default=None, help="PostgreSQL server; default: embedded")
    parser.add_argument("--redis-url", default=None, help="default: embedded")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--slots", type=int, help="device adapter slots of the worker")
    parser.add_argument("--host-share", type=float, help="share of the long tail the host budget holds")
    parser.add_argument("--no-results-md", action="store_true", help="do not update benchmarks/RESULTS.md")
    parser.add_argument(
        "--tail", action="append", choices=TAILS, help="run only this long tail's passes (repeatable)"
    )
    parser.add_argument("--measured-hours", type=int, help="measured compressed hours per pass (default 4)")
    parser.add_argument(
        "--seed",
        type=int,
        help="the trace's random seed (default 0): another seed draws other arrival times and adapters, so "
        "that a difference between passes can be told from the luck of one trace",
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="run the trace on a clock this many times slower (rates divided, the hour and the predictor's "
        "interval, lead and window multiplied), for a CPU this many times slower than the one it was set on",
    )
    args = parser.parse_args(argv)
    cfg = ColdStartConfig()
    if args.quick:
        cfg = replace(cfg, trace=ColdStartTraceConfig(**QUICK_TRACE), passes=QUICK_PASSES, num_adapter_slots=4,
                      predictor_flags=QUICK_PREDICTOR_FLAGS, quick=True, update_results_md=False)  # fmt: skip
    overrides: dict = {
        "database_url": args.database_url,
        "redis_url": args.redis_url,
        "results_dir": args.results_dir,
        "command": " ".join(["python -m benchmarks.coldstart", *argv]),
    }
    if args.slots is not None:
        overrides["num_adapter_slots"] = args.slots
    if args.host_share is not None:
        if not (math.isfinite(args.host_share) and 0 <= args.host_share <= 1):
            parser.error("--host-share must be in [0, 1]")
        overrides["host_share"] = args.host_share
    if args.no_results_md:
        overrides["update_results_md"] = False
    if args.tail:
        overrides["passes"] = tuple((tail, on) for tail, on in cfg.passes if tail in args.tail)
    trace = cfg.trace
    if args.measured_hours is not None:
        if args.measured_hours < 1:
            parser.error("--measured-hours must be >= 1")
        trace = replace(trace, num_measured_hours=args.measured_hours)
    if args.seed is not None:
        if args.seed < 0:
            parser.error("--seed must be >= 0")
        trace = replace(trace, seed=args.seed)
    overrides["trace"] = trace
    cfg = replace(cfg, **overrides)
    try:
        return time_scaled(cfg, args.time_scale) if args.time_scale != 1.0 else cfg
    except ValueError as e:
        parser.error(f"--time-scale: {e}")


def main(argv: list[str] | None = None) -> int:
    results = run(config_from_args(sys.argv[1:] if argv is None else argv))
    return 1 if "incomplete" in results else 0


if __name__ == "__main__":
    sys.exit(main())
