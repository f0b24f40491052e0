"""`openlora up --quantize int4` serves: a generate streams text, and the worker reports its weight format,
bits per weight and resident bytes in its startup log and as Prometheus gauges."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from openlora.client import Client

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[2]


def _support():
    return sys.modules["worker_test_support"]  # loaded by tests/conftest.py


def _gauges(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("openlora_base_weight"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


@pytest.mark.parametrize("kernel", ["native", "tinygemm"])
def test_up_with_int4_serves_the_demo_path_and_reports_the_format(database_url, redis_url, tmp_path, kernel):
    support = _support()
    from tests.e2e.up_process import (  # after _support(): it reads that module
        start_up,
        stopping_up,
        up_command,
    )

    # A tiny model placed as up's demo model (no training here); up pushes its adapters as the demo's.
    support.write_tiny_model(tmp_path / "model")
    # tinygemm: a machine without a C compiler (the native kernel cannot be built) still serves int4.
    env = {"CC": str(tmp_path / "no-compiler")} if kernel == "tinygemm" else {}

    def start() -> tuple[subprocess.Popen, dict[str, str], int]:
        """up with the worker's /metrics on a port picked free; stopped, with an error saying so, when that
        port was taken before the worker bound it (then started again on another)."""
        metrics_port = support.free_port()
        flags = ("--quantize", "int4", "--database-url", database_url, "--redis-url", redis_url)
        flags += (f"--worker-arg=--metrics-port={metrics_port}",)
        process, fields = start_up(
            *up_command(tmp_path, tmp_path / "model", *flags, env=env), tmp_path / "up.log"
        )
        return process, fields, metrics_port

    process, fields, metrics_port = support.retry_on_taken_port(start)
    with stopping_up(process):
        with Client(fields["inference"], fields["key"]) as client:
            text = "".join(client.generate("hello world", adapter="ad0", max_tokens=8))
        assert text.strip()
        log = (tmp_path / "state" / "logs" / "worker.log").read_text(errors="replace")
        assert "base weights: int4" in log
        assert ("; kernel native float32" if kernel == "native" else "; kernel tinygemm (cpu") in log
        gauges = _gauges(metrics_port)
        assert gauges['openlora_base_weight_format_info{format="int4"}'] == 1
        assert 4.0 < gauges["openlora_base_weight_bits_per_weight"] < 5.0  # scales and offsets included
        assert gauges["openlora_base_weight_bytes"] > 0
