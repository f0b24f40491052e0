"""The serving subcommands' argument handling (no servers)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from openlora.commands.serving import _parse_mix, add_commands, worker_config_from_args


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_mix_flag_parses_names_and_weights():
    assert _parse_mix("a=0.5, b=0.25") == [("a", 0.5), ("b", 0.25)]
    with pytest.raises(argparse.ArgumentTypeError, match="NAME=WEIGHT"):
        _parse_mix("a")
    with pytest.raises(argparse.ArgumentTypeError, match="not a number"):
        _parse_mix("a=x")


def test_worker_flags_build_one_frozen_config(tmp_path):
    args = _parse(
        ["worker", "--model", str(tmp_path), "--control-plane", "cp:1", "--worker-token", "t" * 20,
         "--max-waiting", "7", "--auth-cache-ttl-s", "2", "--num-kv-blocks", "64"]
    )  # fmt: skip
    config = worker_config_from_args(args)
    assert (config.control_plane_target, config.max_waiting, config.auth_cache_ttl_s) == ("cp:1", 7, 2.0)
    assert config.engine.num_kv_blocks == 64
    assert config.base_model_name == Path(tmp_path).name
    with pytest.raises(AttributeError):
        config.max_waiting = 1  # type: ignore[misc]


def test_worker_environment_is_the_fallback_for_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENLORA_WORKER_TOKEN", "from-env-" + "x" * 10)
    monkeypatch.setenv("OPENLORA_CONTROL_PLANE", "cp:2")
    monkeypatch.setenv("OPENLORA_MAX_WAITING", "9")
    config = worker_config_from_args(_parse(["worker", "--model", str(tmp_path), "--max-waiting", "3"]))
    assert config.worker_token.startswith("from-env-")
    assert config.control_plane_target == "cp:2"
    assert config.max_waiting == 3


def test_auth_cache_ttl_over_ten_seconds_is_refused(tmp_path):
    args = _parse(
        [
            "worker",
            "--model",
            str(tmp_path),
            "--control-plane",
            "cp:1",
            "--worker-token",
            "t",
            "--auth-cache-ttl-s",
            "11",
        ]
    )
    with pytest.raises(ValueError, match="auth_cache_ttl_s"):
        worker_config_from_args(args)


def test_generate_without_target_or_key_explains_what_to_do(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "OPENLORA_CONTEXT": str(tmp_path / "missing.json"), "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "openlora.cli", "generate", "hello"],
        env=env, capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert result.returncode == 2
    assert "openlora up" in result.stderr


def test_a_refused_generate_prints_nothing_to_stdout_and_the_status_to_stderr(system, tmp_path):
    """Nothing was streamed: stdout stays empty (it printed an empty line), the refusal goes to stderr."""
    _, _, key = system.new_tenant()
    env = {"PATH": "/usr/bin:/bin", "OPENLORA_CONTEXT": str(tmp_path / "missing.json"), "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "openlora.cli", "generate", "--target", system.target, "--api-key", key,
         "--adapter", "no-such-adapter", "hello"],
        env=env, capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("error: NOT_FOUND")
