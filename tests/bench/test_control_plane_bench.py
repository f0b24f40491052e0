"""benchmarks.control_plane_bench: each per-request call of the control plane timed on a fresh database,
which is dropped afterwards."""

from __future__ import annotations

import json

import psycopg

from benchmarks import control_plane_bench


def _bench_databases(server_url: str) -> set[str]:
    """The benchmark's databases on the server (the other test worker creates and drops its own
    databases on the same server meanwhile: those are not this test's to count)."""
    libpq = server_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(libpq, autocommit=True) as conn:
        rows = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'openlora_cp_bench_%'")
        return {row[0] for row in rows}


def test_times_every_call_on_a_fresh_database_and_drops_it(postgres_server_url, tmp_path, capsys):
    before = _bench_databases(postgres_server_url)
    out = tmp_path / "cp.json"
    argv = ["--database-url", postgres_server_url, "--calls", "4", "--rounds", "2", "--out", str(out)]
    assert control_plane_bench.main(argv) == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {
        "reserve_request_id",
        "reserve_request_ids, batches of 16",
        "report_usage, batches of 1",
        "report_usage, batches of 16",
        "report_usage, batches of 16 over 16 counter lines",
        "authorize (key only)",
    }
    for figures in results.values():
        assert len(figures["cpu_ms_rounds"]) == 2
        assert figures["cpu_ms_per_call"] > 0 and figures["wall_ms_per_call"] > 0
    assert "| reserve_request_id |" in capsys.readouterr().out
    assert _bench_databases(postgres_server_url) == before
