"""The Node.js example's own flags: `--help` prints its usage, and an option it does not know is refused,
neither of them sent to a worker as the prompt."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

NODE_DIR = Path(__file__).resolve().parents[2] / "examples" / "node"
# Nothing listens on port 1: a call the example makes ends UNAVAILABLE, so a flag taken as the prompt shows.
UNREACHABLE = "127.0.0.1:1"


def _run_example(*args: str) -> subprocess.CompletedProcess:
    if shutil.which("node") is None or not (NODE_DIR / "node_modules").is_dir():
        pytest.skip("node or the example's node_modules is not installed")
    env = {**os.environ, "OPENLORA_TARGET": UNREACHABLE, "OPENLORA_API_KEY": "olk_unused"}
    return subprocess.run(
        ["node", "generate.js", *args], capture_output=True, text=True, timeout=60, cwd=NODE_DIR, env=env
    )


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_the_usage_and_calls_no_worker(flag):
    run = _run_example(flag)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("usage: node generate.js")
    assert "--max-tokens" in run.stdout
    assert "UNAVAILABLE" not in run.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--adaptor", "uppercase", "the quick fox =>"], "unknown option --adaptor"),
        (["--max-tokens", "many", "the quick fox =>"], "--max-tokens must be a positive integer, got many"),
        (["--max-tokens", "0", "the quick fox =>"], "--max-tokens must be a positive integer, got 0"),
    ],
)
def test_a_flag_the_example_cannot_take_is_refused_naming_it(args, words):
    run = _run_example(*args)
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert f"error: {words}" in run.stderr
    assert "UNAVAILABLE" not in run.stderr
