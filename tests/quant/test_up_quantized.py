"""`openlora up --quantize int4` serves: a generate streams text, and the worker reports its weight format,
bits per weight and resident bytes in its startup log and as Prometheus gauges."""

from __future__ import annotations

import importlib.util
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from openlora.client import Client
from openlora.embedded import free_port

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[2]


def _support():
    if "worker_test_support" in sys.modules:
        return sys.modules["worker_test_support"]
    spec = importlib.util.spec_from_file_location(
        "worker_test_support", REPO_ROOT / "tests/worker/support.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["worker_test_support"] = module
    spec.loader.exec_module(module)
    return module


def _ready_line(process: subprocess.Popen, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    buffer = b""
    while time.monotonic() < deadline and process.poll() is None:
        ready, _, _ = select.select([process.stdout], [], [], 0.5)
        if ready:
            buffer += os.read(process.stdout.fileno(), 4096)
            for line in buffer.decode(errors="replace").splitlines():
                if line.startswith("ready "):
                    return line
    raise AssertionError(f"no ready line (exit {process.poll()}): {buffer.decode(errors='replace')[-2000:]}")


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
    # tinygemm: a machine without a C compiler (the native kernel cannot be built) still serves int4.
    state = tmp_path / "state"
    # A tiny model placed as up's demo model (no training here); up pushes its adapters as the demo's.
    _support().write_tiny_model(tmp_path / "model")
    shutil.copytree(tmp_path / "model", state / "demo-model")
    (state / "demo-model" / ".complete").write_text("ok\n")
    metrics_port = free_port()
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO_ROOT),
        OPENLORA_CONTEXT=str(tmp_path / "context.json"),
        XDG_CONFIG_HOME=str(tmp_path / "config"),
    )
    if kernel == "tinygemm":
        env["CC"] = str(tmp_path / "no-compiler")
    argv = [
        sys.executable, "-m", "openlora.cli", "up", "--quantize", "int4",
        "--state-dir", str(state), "--database-url", database_url, "--redis-url", redis_url,
        "--port", "0", "--admin-port", "0", "--drain-grace-s", "2",
        "--worker-arg=--num-kv-blocks=64", "--worker-arg=--max-lora-rank=16",
        f"--worker-arg=--metrics-port={metrics_port}",
    ]  # fmt: skip
    process = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO_ROOT
    )
    try:
        line = _ready_line(process, timeout_s=180)
        fields = dict(part.split("=", 1) for part in line.split()[1:])
        with Client(fields["inference"], fields["key"]) as client:
            text = "".join(client.generate("hello world", adapter="ad0", max_tokens=8))
        assert text.strip()
        log = (state / "logs" / "worker.log").read_text(errors="replace")
        assert "base weights: int4" in log
        assert ("; kernel native float32" if kernel == "native" else "; kernel tinygemm (cpu") in log
        gauges = _gauges(metrics_port)
        assert gauges['openlora_base_weight_format_info{format="int4"}'] == 1
        assert 4.0 < gauges["openlora_base_weight_bits_per_weight"] < 5.0  # scales and offsets included
        assert gauges["openlora_base_weight_bytes"] > 0
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
