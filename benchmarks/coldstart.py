"""Cold start of the long tail (issue 7): is an adapter called once an "hour" still fast on its call?

The trace mixes power-law traffic over a few popular adapters with many long-tail adapters, each called
periodically on a compressed clock (an "hour" lasts `hour_s` seconds), on a worker whose device slots and
host-memory budget cannot hold every adapter. The first `num_history_hours` hours build the usage history
the predictor needs; the hours after them are measured. The same trace runs twice, each time on a fresh
control plane (fresh database) and a fresh worker: hints ON (the predictor publishes prewarm hints every
`predictor_interval_s`, `lead_s` before each predicted call) and hints OFF (no predictor). One adapter is
uploaded and first requested during the measured hours: its first call ever is fetched from the control
plane (tier REMOTE).

Reported for popular and long-tail requests separately: TTFT p50/p99 (client clock, from the scheduled
arrival), the cache tier each was served from (`timing.cache_tier` of the last message), and the decode
inter-token latency p99 of requests while an adapter load of another request was in flight against while
none was (load windows from each request's `timing.queue_ms` and `timing.adapter_load_ms`).

    python -m benchmarks.coldstart            # full run (about 4 minutes on 2 CPU cores)
    python -m benchmarks.coldstart --quick    # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import dataclasses
import json
import os
import re
import secrets
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from benchmarks import fixtures
from benchmarks.load import percentiles, run_load
from benchmarks.report import format_table, update_results_md
from benchmarks.run import jsonable, machine_info, utc_now
from benchmarks.trace import FIRST_PROMPT_TOKEN_ID, TraceRequest, adapter_name, arrival_times_s, popularity

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
MARKER = "benchmarks.coldstart"
POPULAR, LONG_TAIL, FIRST_CALL = "popular", "long_tail", "first_call"
WARM_TIERS = ("device", "host")

# ------------------------------------------------------------------------------------------- the trace


@dataclass(frozen=True)
class ColdStartTraceConfig:
    num_popular: int = 6
    popular_rate_per_s: float = 1.5
    alpha: float = 1.0
    num_long_tail: int = 20
    hour_s: float = 10.0  # the compressed "hour": each long-tail adapter is called once per hour
    num_history_hours: int = 4  # calls before the measured hours (the predictor needs min_gaps + 1)
    num_measured_hours: int = 5
    jitter_s: float = 0.05  # each long-tail call moves by up to this much either way
    prompt_len_range: tuple[int, int] = (16, 32)
    output_len_range: tuple[int, int] = (12, 12)
    vocab_size: int = 32000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_popular < 1 or self.num_long_tail < 1:
            raise ValueError("num_popular and num_long_tail must be >= 1")
        if self.popular_rate_per_s <= 0 or self.hour_s <= 0:
            raise ValueError("popular_rate_per_s and hour_s must be > 0")
        if self.num_history_hours < 0 or self.num_measured_hours < 1:
            raise ValueError("num_history_hours must be >= 0 and num_measured_hours >= 1")
        if not 0 <= self.jitter_s < self.hour_s / (2 * self.num_long_tail):
            raise ValueError("jitter_s must be >= 0 and below half the spacing of long-tail calls")

    @property
    def num_hours(self) -> int:
        return self.num_history_hours + self.num_measured_hours

    @property
    def duration_s(self) -> float:
        return self.num_hours * self.hour_s

    @property
    def measured_from_s(self) -> float:
        return self.num_history_hours * self.hour_s

    @property
    def popular_names(self) -> list[str]:
        return [adapter_name(i) for i in range(self.num_popular)]

    @property
    def long_tail_names(self) -> list[str]:
        return [adapter_name(self.num_popular + j) for j in range(self.num_long_tail)]

    @property
    def first_call_name(self) -> str:
        return adapter_name(self.num_popular + self.num_long_tail)

    @property
    def num_adapters(self) -> int:
        return self.num_popular + self.num_long_tail + 1


@dataclass(frozen=True)
class ColdStartRequest:
    request: TraceRequest
    kind: str  # POPULAR | LONG_TAIL | FIRST_CALL
    hour: int  # the compressed hour it arrives in (for a long-tail adapter: which of its calls)
    measured: bool  # arrives after the history hours


def long_tail_call_times_s(config: ColdStartTraceConfig, rng: np.random.Generator) -> list[list[float]]:
    """(num_long_tail, num_hours) call times: adapter j is called at phase_j + k * hour_s (+ jitter), with
    the phases spread evenly over the hour so that the long tail arrives at a steady rate."""
    spacing_s = config.hour_s / config.num_long_tail
    times = []
    for j in range(config.num_long_tail):
        phase_s = (j + 0.5) * spacing_s
        jitter = rng.uniform(-config.jitter_s, config.jitter_s, size=config.num_hours)
        times.append([phase_s + k * config.hour_s + float(jitter[k]) for k in range(config.num_hours)])
    return times


def generate_coldstart_trace(config: ColdStartTraceConfig) -> list[ColdStartRequest]:
    """The requests of one run in arrival order (the same config always gives the same trace)."""
    rng = np.random.default_rng(config.seed)
    arrivals: list[tuple[float, str, str, int]] = []  # (arrival_s, adapter, kind, hour)
    expected = config.popular_rate_per_s * config.duration_s
    popular_s = arrival_times_s(int(expected * 2) + 8, config.popular_rate_per_s, 1.0, rng)
    popular_s = popular_s[popular_s < config.duration_s]
    choices = rng.choice(
        config.num_popular, size=len(popular_s), p=popularity(config.num_popular, config.alpha)
    )
    for t, index in zip(popular_s, choices, strict=True):
        arrivals.append((float(t), adapter_name(int(index)), POPULAR, int(t // config.hour_s)))
    names = config.long_tail_names
    for j, calls in enumerate(long_tail_call_times_s(config, rng)):
        arrivals.extend((t, names[j], LONG_TAIL, k) for k, t in enumerate(calls))
    # Halfway through the measured hours, between two long-tail calls.
    first_call_hour = config.num_history_hours + config.num_measured_hours // 2
    first_call_s = first_call_hour * config.hour_s + 0.25 * config.hour_s / config.num_long_tail
    arrivals.append((first_call_s, config.first_call_name, FIRST_CALL, first_call_hour))
    arrivals.sort(key=lambda a: a[0])
    out = []
    for index, (t, adapter, kind, hour) in enumerate(arrivals):
        prompt_len = int(rng.integers(config.prompt_len_range[0], config.prompt_len_range[1] + 1))
        output_len = int(rng.integers(config.output_len_range[0], config.output_len_range[1] + 1))
        prompt = rng.integers(FIRST_PROMPT_TOKEN_ID, config.vocab_size, size=prompt_len)
        request = TraceRequest(index, t, adapter, tuple(int(x) for x in prompt), output_len)
        out.append(ColdStartRequest(request, kind, hour, t >= config.measured_from_s))
    return out


# ---------------------------------------------------------------------------------------- the analysis


def load_window_s(record: dict) -> tuple[float, float] | None:
    """(start, end) on the client clock (seconds from the replay's t0) while this request's adapter was
    loading, or None. The worker received it at scheduled + send lag; its adapter landed before it was
    scheduled (`queue_ms` after arrival) and had been loading for `adapter_load_ms`."""
    load_ms, queue_ms = record.get("adapter_load_ms"), record.get("queue_ms")
    if record.get("error") or not load_ms or queue_ms is None:
        return None
    arrived_s = record["scheduled_s"] + record.get("send_lag_ms", 0.0) / 1000.0
    end_s = arrived_s + queue_ms / 1000.0
    return max(arrived_s, end_s - load_ms / 1000.0), end_s


def itl_intervals_s(record: dict) -> list[tuple[float, float, float]]:
    """(start, end, itl_ms) of each inter-token sample of a request, on the client clock: the first token
    came at scheduled + TTFT, each later one `itl_ms` after the one before."""
    if record.get("error") or record.get("ttft_ms") is None:
        return []
    t = record["scheduled_s"] + record["ttft_ms"] / 1000.0
    out = []
    for itl_ms in record["itl_ms"]:
        out.append((t, t + itl_ms / 1000.0, itl_ms))
        t += itl_ms / 1000.0
    return out


def _merge(windows: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(windows):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def split_itl_by_loads(records: Sequence[dict]) -> tuple[list[float], list[float], int]:
    """(ITL samples overlapping a load in flight, the others, number of load windows). A request's own
    load ends before its first token, so only other requests' loads can overlap its samples."""
    windows = [w for w in (load_window_s(r) for r in records) if w is not None]
    merged = _merge(windows)
    starts = [a for a, _ in merged]
    during, idle = [], []
    for record in records:
        for start, end, itl_ms in itl_intervals_s(record):
            i = bisect.bisect_left(starts, end) - 1  # last window starting before the sample ends
            (during if i >= 0 and merged[i][1] > start else idle).append(itl_ms)
    return during, idle, len(windows)


def summarize_kind(records: Sequence[dict]) -> dict:
    ok = [r for r in records if not r.get("error")]
    tiers = Counter(r.get("cache_tier") or "unknown" for r in ok)
    warm = sum(tiers[t] for t in WARM_TIERS)
    return {
        "requests": len(records),
        "errors": len(records) - len(ok),
        "ttft_ms": percentiles([r["ttft_ms"] for r in ok if r.get("ttft_ms") is not None]),
        "server_ttft_ms": percentiles(
            [r["server_ttft_ms"] for r in ok if r.get("server_ttft_ms") is not None]
        ),
        "adapter_load_ms": percentiles([r["adapter_load_ms"] or 0.0 for r in ok]),
        "tiers": dict(sorted(tiers.items())),
        "warm_share": warm / len(ok) if ok else None,
    }


def analyze(requests: Sequence[ColdStartRequest], records: Sequence[dict]) -> dict:
    """Figures of one pass: per kind over the measured hours, the first call, the history hours, ITL."""
    by_index = {r["index"]: r for r in records}
    groups: dict[str, list[dict]] = {POPULAR: [], LONG_TAIL: [], FIRST_CALL: [], "history": []}
    for request in requests:
        record = by_index[request.request.index]
        groups[request.kind if request.measured else "history"].append(record)
    measured = [by_index[r.request.index] for r in requests if r.measured]
    during, idle, num_windows = split_itl_by_loads(measured)
    itl = {
        "during_loads_ms": percentiles(during),
        "no_load_ms": percentiles(idle),
        "during_samples": len(during),
        "no_load_samples": len(idle),
        "load_windows": num_windows,
    }
    p99_during, p99_idle = itl["during_loads_ms"]["p99"], itl["no_load_ms"]["p99"]
    itl["p99_ratio"] = p99_during / p99_idle if p99_during is not None and p99_idle else None
    first = groups[FIRST_CALL][0] if groups[FIRST_CALL] else {}
    return {
        POPULAR: summarize_kind(groups[POPULAR]),
        LONG_TAIL: summarize_kind(groups[LONG_TAIL]),
        "history": summarize_kind(groups["history"]),
        FIRST_CALL: {
            "ttft_ms": first.get("ttft_ms"),
            "tier": first.get("cache_tier"),
            "adapter_load_ms": first.get("adapter_load_ms"),
            "error": first.get("error"),
        },
        "itl": itl,
    }


def targets(hints_on: dict) -> dict[str, dict]:
    """The issue's three targets, checked on the hints-ON pass."""
    pop_p99 = hints_on[POPULAR]["ttft_ms"]["p99"]
    lt_p99 = hints_on[LONG_TAIL]["ttft_ms"]["p99"]
    ratio = lt_p99 / pop_p99 if lt_p99 is not None and pop_p99 else None
    warm = hints_on[LONG_TAIL]["warm_share"]
    itl_ratio = hints_on["itl"]["p99_ratio"]
    return {
        "long_tail_ttft_p99_vs_popular": {
            "value": ratio,
            "target": "<= 1.5",
            "met": ratio is not None and ratio <= 1.5,
        },
        "long_tail_warm_share": {"value": warm, "target": ">= 0.90", "met": warm is not None and warm >= 0.9},
        "itl_p99_during_loads_vs_none": {
            "value": itl_ratio,
            "target": "<= 1.10",
            "met": itl_ratio is not None and itl_ratio <= 1.1,
        },
    }


# --------------------------------------------------------------------------------- the system under test


@dataclass(frozen=True)
class ColdStartConfig:
    trace: ColdStartTraceConfig = ColdStartTraceConfig()
    num_adapter_slots: int = 8
    num_host_adapters: int = 12  # host-memory budget, in adapters (packed float32 on CPU)
    max_num_seqs: int = 32
    predictor_interval_s: float = 0.5  # hints ON pass; the OFF pass runs no predictor
    lead_s: float = 2.0  # prewarm this long before a predicted call
    # The predictor's EWMA time constant and "hot" rate, on the compressed clock.
    rate_time_constant_s: float = 30.0
    resident_rate_per_s: float = 0.2
    device: str = "cpu"
    database_url: str | None = None  # None: embedded PostgreSQL (a fresh database per pass either way)
    redis_url: str | None = None  # None: embedded Redis
    results_dir: Path = RESULTS_DIR
    update_results_md: bool = True
    quick: bool = False
    command: str = "python -m benchmarks.coldstart"


QUICK_TRACE = dict(
    num_popular=4,
    popular_rate_per_s=1.0,
    num_long_tail=8,
    hour_s=3.0,
    num_history_hours=4,
    num_measured_hours=2,
    output_len_range=(8, 8),
    prompt_len_range=(8, 16),
)


@dataclass
class Pass:
    """One started control plane + worker pair for one pass of the trace."""

    inference_target: str
    admin_target: str
    api_key: str
    worker_log: Path
    control_plane_log: Path


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
    """Bytes of one adapter's packed host copy: every LoRA factor in float32 (the CPU engine's dtype)."""
    from safetensors import safe_open

    with safe_open(adapter_dir / "adapter_model.safetensors", framework="numpy") as f:
        return sum(4 * int(np.prod(f.get_slice(name).get_shape())) for name in f.keys())  # noqa: SIM118


def host_cache_bytes(cfg: ColdStartConfig, adapter_dir: Path) -> int:
    """The worker's host-memory budget: `num_host_adapters` packed adapters and 1 MiB of slack."""
    return cfg.num_host_adapters * host_bytes_per_adapter(adapter_dir) + (1 << 20)


@contextlib.contextmanager
def start_pass(
    cfg: ColdStartConfig, hints_on: bool, database_url: str, redis_url: str, model_dir: Path, state_dir: Path
) -> Iterator[Pass]:
    """A fresh control plane (predictor on or off) and a fresh worker, the adapters uploaded for one
    tenant; everything is stopped when the block ends."""
    from openlora.admin_client import AdminClient

    # `up`'s own helpers: this starts the same children, with the predictor set for a compressed clock.
    from openlora.commands.up import Child, _free_port, _wait_serving

    state_dir.mkdir(parents=True, exist_ok=True)
    admin_key, worker_token = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    admin_target, inference_target = (f"127.0.0.1:{_free_port('127.0.0.1')}" for _ in range(2))
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENLORA_")}
    env["OPENLORA_WORKER_TOKEN"] = worker_token
    adapter_dirs = fixtures.ensure_adapters(cfg.trace.num_adapters, fixtures.LLAMA_50M)
    children = []
    try:
        children.append(
            Child(
                "control plane",
                [
                    sys.executable, "-m", "benchmarks.coldstart", "control-plane",
                    "--listen", admin_target, "--database-url", database_url, "--redis-url", redis_url,
                    "--state-dir", str(state_dir / "control-plane"), f"--admin-key={admin_key}",
                    "--predictor-interval-s", str(cfg.predictor_interval_s if hints_on else 0.0),
                    "--lead-s", str(cfg.lead_s), "--rate-time-constant-s", str(cfg.rate_time_constant_s),
                    "--resident-rate-per-s", str(cfg.resident_rate_per_s),
                ],
                env,
                state_dir / "control-plane.log",
            )
        )  # fmt: skip
        _wait_serving(admin_target, children, timeout_s=300.0)
        children.insert(
            0,
            Child(
                "worker",
                [
                    sys.executable, "-m", "openlora.cli", "worker",
                    "--listen", inference_target, "--control-plane", admin_target,
                    "--model", str(model_dir), "--state-dir", str(state_dir / "worker"),
                    "--redis-url", redis_url, "--device", cfg.device,
                    "--num-adapter-slots", str(cfg.num_adapter_slots),
                    "--host-cache-bytes", str(host_cache_bytes(cfg, adapter_dirs[0])),
                    "--max-num-seqs", str(cfg.max_num_seqs), "--drain-grace-s", "5",
                    "--log-level", "DEBUG",  # one line per adapter load, by cause and source tier
                ],
                env,
                state_dir / "worker.log",
            ),
        )  # fmt: skip
        _wait_serving(inference_target, children, timeout_s=300.0)
        tenant = "coldstart"
        with AdminClient(admin_target, admin_key, timeout_s=120) as admin:
            admin.create_tenant(tenant)
            api_key = admin.create_api_key(tenant=tenant).secret
            for index, directory in enumerate(adapter_dirs):
                admin.upload_adapter(directory, adapter_name(index), model_dir.name, tenant=tenant)
        yield Pass(
            inference_target, admin_target, api_key, state_dir / "worker.log", state_dir / "control-plane.log"
        )
    finally:
        for child in children:
            child.stop(30.0)


def run_pass(
    cfg: ColdStartConfig,
    requests: list[ColdStartRequest],
    hints_on: bool,
    urls: tuple[str, str],
    model_dir: Path,
    state_root: Path,
) -> dict:
    label = "on" if hints_on else "off"
    database_server_url, redis_url = urls
    started = time.perf_counter()
    database_name = f"coldstart_{label}_{secrets.token_hex(4)}"
    with (
        fresh_database(database_server_url, database_name) as database_url,
        start_pass(cfg, hints_on, database_url, redis_url, model_dir, state_root / f"hints-{label}") as p,
    ):
        ready_s = time.perf_counter() - started
        print(
            f"hints {label}: system up in {ready_s:.0f} s; replaying {len(requests)} requests "
            f"over {cfg.trace.duration_s:.0f} s",
            flush=True,
        )
        hints_before = _stream_length(redis_url)
        result = run_load(
            [r.request for r in requests], p.inference_target, p.api_key, run_tag=f"cold-{label}"
        )
        num_hints = _stream_length(redis_url) - hints_before
        load_events = worker_load_events(p.worker_log.read_text(errors="replace"))
    figures = analyze(requests, result["records"])
    figures["hints_published"] = num_hints
    figures["hints_per_min"] = num_hints / (result["summary"]["duration_s"] / 60.0)
    figures["worker_loads"] = load_events
    figures["startup_s"] = ready_s
    figures["replay_s"] = result["summary"]["duration_s"]
    figures["errors_by_code"] = result["summary"]["errors_by_code"]
    return {"figures": figures, "records": result["records"]}


def _stream_length(redis_url: str) -> int:
    import redis

    from openlora.hints import HINTS_STREAM

    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.xlen(HINTS_STREAM))
    finally:
        client.close()


LOAD_EVENT = re.compile(
    r"adapter load cause=(\w+) tier=(\w+) to=(\w+) key=\S+ read_ms=([\d.]+) copy_ms=([\d.]+)"
)


def worker_load_events(log_text: str) -> dict[str, dict]:
    """The worker's finished adapter loads (its debug log) by "cause/source tier->destination": count and
    duration percentiles (read + copy ms, on the loader thread; queueing before it not included)."""
    by_event: dict[str, list[float]] = {}
    for match in LOAD_EVENT.finditer(log_text):
        cause, tier, to, read_ms, copy_ms = match.groups()
        by_event.setdefault(f"{cause}/{tier}->{to}", []).append(float(read_ms) + float(copy_ms))
    return {event: {"count": len(ms), "ms": percentiles(ms)} for event, ms in sorted(by_event.items())}


# ----------------------------------------------------------------------- the control plane of one pass


def serve_control_plane(argv: list[str]) -> int:
    """`python -m benchmarks.coldstart control-plane ...`: the control plane with the predictor's config
    set for the compressed clock (run in this process beside the gRPC server; interval 0: no predictor)."""
    import logging

    from control_plane.config import ControlPlaneConfig
    from control_plane.prediction.demand import PredictorConfig
    from control_plane.prediction.predictor import run_predictor_loop
    from control_plane.server.server import serve

    parser = argparse.ArgumentParser(prog="benchmarks.coldstart control-plane")
    for flag in ("--listen", "--database-url", "--redis-url", "--state-dir", "--admin-key"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--predictor-interval-s", type=float, default=0.0)
    parser.add_argument("--lead-s", type=float, default=2.0)
    parser.add_argument("--rate-time-constant-s", type=float, default=600.0)
    parser.add_argument("--resident-rate-per-s", type=float, default=0.5)
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ControlPlaneConfig(
        database_url=args.database_url,
        state_dir=Path(args.state_dir),
        worker_token=os.environ["OPENLORA_WORKER_TOKEN"],
        listen=args.listen,
        redis_url=args.redis_url,
        admin_key=args.admin_key,
    )
    # The control plane's own predictor loop (when it has one) stays off: this process runs it instead,
    # with a lead time that fits the compressed clock.
    if "predictor_interval_s" in {f.name for f in dataclasses.fields(config)}:
        config = replace(config, predictor_interval_s=0.0)

    async def main() -> None:
        running = await serve(config)
        stop_predictor = threading.Event()
        if args.predictor_interval_s > 0:
            threading.Thread(
                target=run_predictor_loop,
                args=(running.app.sessions, args.redis_url, args.predictor_interval_s, stop_predictor),
                kwargs={
                    "config": PredictorConfig(
                        lead_s=args.lead_s,
                        rate_time_constant_s=args.rate_time_constant_s,
                        resident_rate_per_s=args.resident_rate_per_s,
                    )
                },
                daemon=True,
            ).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        stop_predictor.set()
        await running.stop(2.0)

    asyncio.run(main())
    return 0


# ------------------------------------------------------------------------------------------ reporting

TABLE_HEADER = ("hints", "requests", "n", "TTFT p50 ms", "TTFT p99 ms", "load p99 ms", "tiers", "device+host")


def table_rows(passes: dict[str, dict]) -> list[list]:
    rows = []
    for label, figures in passes.items():
        for kind in (POPULAR, LONG_TAIL, "history"):
            s = figures[kind]
            rows.append([
                label, kind if kind != "history" else "all, history hours", s["requests"], s["ttft_ms"]["p50"],
                s["ttft_ms"]["p99"], s["adapter_load_ms"]["p99"],
                ", ".join(f"{t} {n}" for t, n in s["tiers"].items()),
                f"{s['warm_share']:.0%}" if s["warm_share"] is not None else None,
            ])  # fmt: skip
        first = figures[FIRST_CALL]
        rows.append([label, "first call ever", 1, first["ttft_ms"], first["ttft_ms"], first["adapter_load_ms"],
                     first["tier"] or first["error"], None])  # fmt: skip
        itl = figures["itl"]
        rows.append([
            label, "ITL p99 ms: loads in flight / none", f"{itl['during_samples']}/{itl['no_load_samples']}",
            itl["during_loads_ms"]["p99"], itl["no_load_ms"]["p99"], None,
            f"ratio {itl['p99_ratio']:.2f}" if itl["p99_ratio"] is not None else "ratio n/a",
            f"{itl['load_windows']} loads",
        ])  # fmt: skip
    return rows


def target_lines(checked: dict[str, dict], off: dict | None) -> list[str]:
    names = {
        "long_tail_ttft_p99_vs_popular": "long-tail TTFT p99 / popular TTFT p99 (hints on)",
        "long_tail_warm_share": "periodic long-tail requests served from device or host (hints on)",
        "itl_p99_during_loads_vs_none": "ITL p99 of other requests while loads are in flight / while none (hints on)",
    }
    lines = []
    for key, t in checked.items():
        value = "n/a" if t["value"] is None else f"{t['value']:.2f}"
        if off is not None and off.get(key, {}).get("value") is not None:
            value += f" (hints off: {off[key]['value']:.2f})"
        lines.append(f"- {names[key]}: {value}, target {t['target']}: {'met' if t['met'] else 'MISSED'}")
    return lines


def results_section(results: dict, table: str) -> str:
    m, cfg, tc = results["machine"], results["config"], results["config"]["trace"]
    on, off = results["passes"].get("on"), results["passes"].get("off")
    lines = [
        "## Cold start of the long tail (issue 7)",
        "",
        f"Run {results['started_at']} on {m['nproc']} CPUs ({m['cpu_model']}, {m['memory_gib']} GiB), torch "
        f"{m['torch']} with {m['torch_threads']} threads; `{cfg['command']}` took {results['elapsed_s']:.0f} s.",
        "",
        f"Trace: {tc['num_popular']} popular adapters (power law alpha {tc['alpha']}, Poisson "
        f"{tc['popular_rate_per_s']} requests/s) and {tc['num_long_tail']} long-tail adapters each called once "
        f"per compressed hour of {tc['hour_s']} s (phases spread over the hour, jitter +-{tc['jitter_s']} s); "
        f"{tc['num_history_hours']} history hours, then {tc['num_measured_hours']} measured hours; prompts "
        f"{tc['prompt_len_range'][0]}-{tc['prompt_len_range'][1]} tokens, {tc['output_len_range'][0]} generated. "
        f"Worker: {cfg['num_adapter_slots']} device slots, host budget {cfg['num_host_adapters']} adapters "
        f"({results['host_cache_bytes'] / (1 << 20):.0f} MiB), model {results['model']}, adapters rank 16 on "
        f"all projections. Hints on: predictor every {cfg['predictor_interval_s']} s, lead {cfg['lead_s']} s. "
        "Figures over the measured hours only.",
        "",
        table,
        "",
        "Targets:",
        *target_lines(results["targets"], results.get("targets_hints_off")),
        "",
        "How it was measured:",
        "- Each pass starts its own control plane (fresh database, predictor thread on or off) and worker "
        "(`openlora worker`, fresh state dir) on embedded Postgres/Redis; the same adapters are uploaded "
        "through `UploadAdapter`; the load generator (`benchmarks/load.py`, open loop) shares the CPUs.",
        "- TTFT is client-side from the scheduled arrival; tiers from the last message's `timing.cache_tier`. "
        "A load window is [arrival + queue_ms - adapter_load_ms, arrival + queue_ms] of a request whose "
        "adapter was loaded for it; hint-driven prefetches have no request and are not in these windows.",
    ]
    if on is not None and off is not None:
        lines.append(
            f"- Where the time goes (hints on / off): long-tail server-side TTFT p99 "
            f"{_ms(on[LONG_TAIL]['server_ttft_ms']['p99'])} / {_ms(off[LONG_TAIL]['server_ttft_ms']['p99'])} ms, "
            f"adapter load p99 {_ms(on[LONG_TAIL]['adapter_load_ms']['p99'])} / "
            f"{_ms(off[LONG_TAIL]['adapter_load_ms']['p99'])} ms; popular server-side TTFT p99 "
            f"{_ms(on[POPULAR]['server_ttft_ms']['p99'])} / {_ms(off[POPULAR]['server_ttft_ms']['p99'])} ms."
        )
    for label, figures in results["passes"].items():
        lines.append(f"- Hints {label}: {load_event_line(figures)}")
    return "\n".join(lines) + "\n"


def load_event_line(figures: dict) -> str:
    """Hint traffic and the worker's own account of its loads (whole pass, history hours included)."""
    events = figures.get("worker_loads") or {}
    parts = [
        f"{event} {e['count']} (p50 {_ms(e['ms']['p50'])} ms, p99 {_ms(e['ms']['p99'])} ms)"
        for event, e in events.items()
    ]
    return (
        f"{figures.get('hints_published', 0)} hint stream entries ({figures.get('hints_per_min', 0.0):.0f}/min); "
        f"worker loads by cause/source->destination, loader-thread time: {'; '.join(parts) or 'none'}."
    )


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


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
    requests = generate_coldstart_trace(cfg.trace)
    results: dict = {
        "config": jsonable(asdict(cfg)),
        "machine": machine,
        "started_at": utc_now(),
        "model": f"{fixtures.LLAMA_50M.name} ({fixtures.LLAMA_50M.num_parameters / 1e6:.1f}M parameters, float32)",
        "host_cache_bytes": host_cache_bytes(cfg, adapter_dirs[0]),
        "passes": {},
    }
    records: dict[str, list] = {}
    state_root = Path(tempfile.mkdtemp(prefix="openlora-coldstart-"))
    try:
        with backing_services(cfg, state_root) as urls:
            for hints_on in (True, False):
                label = "on" if hints_on else "off"
                out = run_pass(cfg, requests, hints_on, urls, model_dir, state_root)
                results["passes"][label], records[label] = out["figures"], out["records"]
    except (Exception, KeyboardInterrupt) as error:
        results["incomplete"] = f"{type(error).__name__}: {error}"
        print(f"run stopped early: {results['incomplete']}", file=sys.stderr)
    finally:
        import shutil

        shutil.rmtree(state_root, ignore_errors=True)
    if "on" in results["passes"]:
        results["targets"] = targets(results["passes"]["on"])
    if "off" in results["passes"]:
        results["targets_hints_off"] = targets(results["passes"]["off"])
    results["elapsed_s"] = time.perf_counter() - started
    table = format_table(TABLE_HEADER, table_rows(results["passes"]))
    print(table)
    if "targets" in results:
        print("\n".join(target_lines(results["targets"], results.get("targets_hints_off"))))
    for label, figures in results["passes"].items():
        print(f"hints {label}: {load_event_line(figures)}")
    cfg.results_dir.mkdir(parents=True, exist_ok=True)
    name = "coldstart-quick" if cfg.quick else "coldstart"
    (cfg.results_dir / f"{name}.json").write_text(json.dumps(results, indent=2))
    (cfg.results_dir / f"{name}-records.json").write_text(json.dumps(records))
    if cfg.update_results_md and "incomplete" not in results:
        update_results_md(RESULTS_MD, results_section(results, table), MARKER)
    print(f"wrote {cfg.results_dir / f'{name}.json'} ({results['elapsed_s']:.0f} s)")
    return results


def config_from_args(argv: list[str]) -> ColdStartConfig:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run with a short trace (RESULTS.md untouched)"
    )
    parser.add_argument("--database-url", default=None, help="PostgreSQL server; default: embedded")
    parser.add_argument("--redis-url", default=None, help="default: embedded")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--slots", type=int, help="device adapter slots of the worker")
    parser.add_argument("--host-adapters", type=int, help="host-memory budget in adapters")
    parser.add_argument("--lead-s", type=float, help="prewarm lead before a predicted call")
    parser.add_argument("--no-results-md", action="store_true", help="do not update benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    cfg = ColdStartConfig()
    if args.quick:
        cfg = replace(cfg, trace=ColdStartTraceConfig(**QUICK_TRACE), num_host_adapters=6, num_adapter_slots=4,
                      lead_s=1.0, quick=True, update_results_md=False)  # fmt: skip
    overrides: dict = {
        "database_url": args.database_url,
        "redis_url": args.redis_url,
        "results_dir": args.results_dir,
        "command": " ".join(["python -m benchmarks.coldstart", *argv]),
    }
    for flag, key in (
        ("slots", "num_adapter_slots"),
        ("host_adapters", "num_host_adapters"),
        ("lead_s", "lead_s"),
    ):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    if args.no_results_md:
        overrides["update_results_md"] = False
    return replace(cfg, **overrides)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["control-plane"]:
        return serve_control_plane(argv[1:])
    results = run(config_from_args(argv))
    return 1 if "incomplete" in results else 0


if __name__ == "__main__":
    sys.exit(main())
