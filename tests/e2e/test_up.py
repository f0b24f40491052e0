"""`openlora up` end to end: the ready line, `openlora generate`, the Node client, the demo price on the
invoice, and a clean stop.

The tests of this module share one running `up` and run in file order; the last one stops it. `up` runs
with no --model on a state dir where the (tiny) model already sits as its demo model, so it takes the
demo path (no model is trained here).
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from openlora.admin_client import AdminClient
from openlora.client import Client

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[2]
PROMPT = "hello world"


@dataclass
class Up:
    process: subprocess.Popen
    ready_line: str
    fields: dict[str, str]
    env: dict[str, str]
    descendants: list[psutil.Process]


def _read_ready_line(
    process: subprocess.Popen, timeout_s: float, give_up: Callable[[], bool] = lambda: False
) -> str:
    """`up`'s ready line from its stdout; AssertionError when it exits first, the wait times out or
    `give_up()` says there is no use waiting."""
    deadline = time.monotonic() + timeout_s
    buffer = b""
    while time.monotonic() < deadline and process.poll() is None and not give_up():
        ready, _, _ = select.select([process.stdout], [], [], 0.5)
        if ready:
            buffer += os.read(process.stdout.fileno(), 4096)
            for line in buffer.decode(errors="replace").splitlines():
                if line.startswith("ready "):
                    return line
    raise AssertionError(f"no ready line (exit {process.poll()}): {buffer.decode(errors='replace')[-2000:]}")


@pytest.fixture(scope="module")
def up(database_url, redis_url, e2e_model_dir, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("up")
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO_ROOT),
        OPENLORA_CONTEXT=str(tmp_path / "context.json"),
        XDG_CONFIG_HOME=str(tmp_path / "config"),
    )
    for name in ("OPENLORA_TARGET", "OPENLORA_API_KEY"):
        env.pop(name, None)
    demo_model = tmp_path / "state" / "demo-model"
    shutil.copytree(e2e_model_dir, demo_model)
    (demo_model / ".complete").write_text("ok\n")
    argv = [
        sys.executable, "-m", "openlora.cli", "up",
        "--state-dir", str(tmp_path / "state"),
        "--database-url", database_url,
        "--redis-url", redis_url,
        "--port", "0", "--admin-port", "0",
        "--drain-grace-s", "5",
        "--worker-arg=--num-kv-blocks=256", "--worker-arg=--max-lora-rank=16",
    ]  # fmt: skip
    process = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO_ROOT
    )
    try:
        line = _read_ready_line(process, timeout_s=180)
        fields = dict(part.split("=", 1) for part in line.split()[1:])
        yield Up(process, line, fields, env, psutil.Process(process.pid).children(recursive=True))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_up_prints_the_ready_line_and_writes_the_context(up):
    assert set(up.fields) == {"inference", "admin", "openai", "key"}
    assert up.fields["openai"].startswith("http://127.0.0.1:") and up.fields["openai"].endswith("/v1")
    context = Path(up.env["OPENLORA_CONTEXT"])
    assert oct(context.stat().st_mode & 0o777) == "0o600"
    assert up.fields["key"] in context.read_text()
    assert len(up.descendants) >= 2  # control plane and worker


def test_generate_streams_text_with_no_flags(up):
    generate = subprocess.run(
        [sys.executable, "-m", "openlora.cli", "generate", "--adapter", "ad0", "--max-tokens", "8", PROMPT],
        env=up.env, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
    )  # fmt: skip
    assert generate.returncode == 0, generate.stderr
    with Client(up.fields["inference"], up.fields["key"]) as client:
        expected = "".join(client.generate(PROMPT, adapter="ad0", max_tokens=8))
    assert expected.strip()
    assert generate.stdout.rstrip("\n") == expected


def test_openai_client_gets_the_same_text_from_the_ready_line_url(up):
    import json

    import openai

    assert json.loads(Path(up.env["OPENLORA_CONTEXT"]).read_text())["openai_base_url"] == up.fields["openai"]
    client = openai.OpenAI(base_url=up.fields["openai"], api_key=up.fields["key"], max_retries=0)
    completion = client.completions.create(model="ad0", prompt=PROMPT, max_tokens=8)
    with Client(up.fields["inference"], up.fields["key"]) as grpc_client:
        expected = "".join(grpc_client.generate(PROMPT, adapter="ad0", max_tokens=8))
    assert completion.choices[0].text == expected


def test_node_client_streams_the_same_text(up):
    node_dir = REPO_ROOT / "examples" / "node"
    if shutil.which("node") is None or not (node_dir / "node_modules").is_dir():
        pytest.skip("node or the example's node_modules is not installed")
    node = subprocess.run(
        ["node", "generate.js", "--target", up.fields["inference"], "--key", up.fields["key"],
         "--adapter", "ad0", "--max-tokens", "8", PROMPT],
        capture_output=True, text=True, timeout=60, cwd=node_dir,
    )  # fmt: skip
    assert node.returncode == 0, node.stderr
    with Client(up.fields["inference"], up.fields["key"]) as client:
        expected = "".join(client.generate(PROMPT, adapter="ad0", max_tokens=8))
    assert node.stdout.rstrip("\n") == expected


def test_invoice_charges_the_demo_price_after_a_generate(up):
    with Client(up.fields["inference"], up.fields["key"]) as client:
        assert "".join(client.generate(PROMPT, adapter="ad0", max_tokens=4))
    period = time.strftime("%Y-%m", time.gmtime())
    deadline = time.monotonic() + 60
    with AdminClient(up.fields["admin"], up.fields["key"]) as admin:
        invoice = admin.get_invoice(period, "demo")
        while invoice.charges_micros == 0 and time.monotonic() < deadline:
            time.sleep(0.5)
            invoice = admin.get_invoice(period, "demo")
    tokens = [line for line in invoice.lines if line.kind == "tokens" and line.base_model == "demo-model"]
    assert sum(line.amount_micros for line in tokens) > 0, invoice
    assert invoice.charges_micros > 0


def test_sigterm_stops_every_process_it_started(up):
    up.process.send_signal(signal.SIGTERM)
    assert up.process.wait(120) == 0
    deadline = time.monotonic() + 10
    alive = up.descendants
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.2)
    assert alive == [], [p.cmdline() for p in alive]
