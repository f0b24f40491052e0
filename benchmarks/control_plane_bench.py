"""What the control plane's per-request work costs it: CPU and wall time per call of the `ControlPlane`
methods a worker's requests reach, against a real PostgreSQL, without gRPC.

    python -m benchmarks.control_plane_bench                        # embedded PostgreSQL
    python -m benchmarks.control_plane_bench --database-url URL     # a server: a fresh database on it

Per serving request a worker reserves the client's request id (`reserve_request_id`, or for the calls
that arrive together one `reserve_request_ids`, timed here in batches of 16), reports its usage in
batches (`report_usage`, sent every second: tens of records a batch under load, over as many counter
lines as adapters served; timed with one line a batch and with a line per record) and, once its cached
answer expired, authorizes the caller's key again (`authorize`). Each is called `--calls` times in a round
(for the batched kinds: that many reservations or records), over `--rounds` rounds alternating between
them; the figures are medians over the rounds of milliseconds per reservation, record or authorization:
this process's CPU time (`time.process_time`, the control plane's own Python and driver work, not the
database server's) and wall time (including the database's).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

RESULTS_PATH = Path(__file__).parent / "results" / "control_plane_bench.json"
WORKER_ID = "bench-worker"


@contextmanager
def fresh_database(server_url: str | None) -> Iterator[str]:
    """A URL of an empty database: on the embedded PostgreSQL (None), else created on `server_url`'s
    server and dropped afterwards."""
    if server_url is None:
        from openlora.embedded import EmbeddedPostgres

        with (
            tempfile.TemporaryDirectory(prefix="openlora-cp-bench-") as state,
            EmbeddedPostgres(state) as url,
        ):
            yield url
        return
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"openlora_cp_bench_{uuid.uuid4().hex[:8]}"
    url = make_url(server_url)
    admin = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute(f"DROP DATABASE {name} WITH (FORCE)")


def calls(app, admin_key: str) -> dict[str, Callable[[int], None]]:
    """name -> fn(n): n calls of one kind, each on new keys (a new request id, a new usage event)."""
    from control_plane.usage.service import UsageReport

    tenant_id = str(app.create_tenant(admin_key, "bench").id)
    api_key = app.create_api_key(admin_key, "bench", ["infer"])[2]

    def reports(n: int, lines: int) -> list[UsageReport]:
        """`n` records over `lines` counter lines (the hours they finished in: a batch of a busy worker
        moves one line per adapter it served)."""
        hour = datetime.now(UTC).replace(minute=30, second=0, microsecond=0)
        return [
            UsageReport(
                request_id=f"u-{uuid.uuid4().hex}",
                tenant_id=tenant_id,
                adapters=(),
                worker_id=WORKER_ID,
                base_model="bench-model",
                prompt_tokens=32,
                completion_tokens=40,
                finished_at=hour - timedelta(hours=i % lines),
                finish_reason="length",
                request_kind="single",
            )
            for i in range(n)
        ]

    def usage(batch: int, lines: int = 1) -> Callable[[int], None]:
        def run(n: int) -> None:
            for start in range(0, n, batch):
                app.report_usage(reports(min(batch, n - start), lines))

        return run

    def reserve(n: int) -> None:
        for _ in range(n):
            app.reserve_request_id(tenant_id, f"r-{uuid.uuid4().hex}", WORKER_ID, 120_000)

    def reserve_batches(batch: int) -> Callable[[int], None]:
        def run(n: int) -> None:
            for start in range(0, n, batch):
                entries = [
                    (tenant_id, f"r-{uuid.uuid4().hex}", WORKER_ID, 120_000)
                    for _ in range(min(batch, n - start))
                ]
                app.reserve_request_ids(entries)

        return run

    def authorize(n: int) -> None:
        for _ in range(n):
            app.authorize(api_key, [], "")

    return {
        "reserve_request_id": reserve,
        "reserve_request_ids, batches of 16": reserve_batches(16),
        "report_usage, batches of 1": usage(1),
        "report_usage, batches of 16": usage(16),
        "report_usage, batches of 16 over 16 counter lines": usage(16, 16),
        "authorize (key only)": authorize,
    }


def measure(kinds: dict[str, Callable[[int], None]], num_calls: int, rounds: int) -> dict[str, dict]:
    for run in kinds.values():  # warm: statement caches, connections
        run(min(num_calls, 20))
    samples: dict[str, dict[str, list[float]]] = {k: {"cpu_ms": [], "wall_ms": []} for k in kinds}
    for _ in range(rounds):
        for name, run in kinds.items():
            cpu, wall = time.process_time(), time.perf_counter()
            run(num_calls)
            samples[name]["cpu_ms"].append(1000 * (time.process_time() - cpu) / num_calls)
            samples[name]["wall_ms"].append(1000 * (time.perf_counter() - wall) / num_calls)
    return {
        name: {
            "cpu_ms_per_call": statistics.median(s["cpu_ms"]),
            "wall_ms_per_call": statistics.median(s["wall_ms"]),
            "cpu_ms_rounds": s["cpu_ms"],
        }
        for name, s in samples.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database-url", default=None, help="a PostgreSQL server (default: embedded)")
    parser.add_argument("--calls", type=int, default=200, help="calls of each kind per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS_PATH)
    args = parser.parse_args(argv)
    if args.calls < 1 or args.rounds < 1:
        parser.error("--calls and --rounds must be >= 1")

    from control_plane.config import ControlPlaneConfig
    from control_plane.server.server import prepare

    with fresh_database(args.database_url) as url, tempfile.TemporaryDirectory() as state:
        # No Redis: hints are not what is measured.
        config = ControlPlaneConfig(database_url=url, state_dir=Path(state), worker_token="w" * 32)
        app, engine, admin_key, _ = prepare(config)
        try:
            results = measure(calls(app, admin_key), args.calls, args.rounds)
        finally:
            engine.dispose()
    print(f"{args.calls} calls a round, {args.rounds} rounds; median ms per call:")
    print("| call | CPU ms | wall ms |\n|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['cpu_ms_per_call']:.3f} | {r['wall_ms_per_call']:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"calls": args.calls, "rounds": args.rounds, "results": results}, indent=1)
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
