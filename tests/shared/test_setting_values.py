"""Every numeric flag and OPENLORA_* variable of every command is read by one rule (openlora.setting_rules):
ASCII digits (and decimal or scientific notation for numbers), a '-' only where negatives are taken, never
NaN or infinity, within the range the code uses. Python's int() and float() took `1_000`, `١٢` and ` 12`,
which no other server takes. Yes/no words and named choices are matched in any ASCII case, nothing else.
Driven through the real command line; a refusal exits 2 (CONFIG_ERROR_EXIT_CODE) and names the flag, and
the variable when the value came from there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from control_plane.prediction.settings import INTERVAL_FLAG, PREDICTOR_FLAGS
from openlora.cli import main
from openlora.commands.supervise import CONFIG_ERROR_EXIT_CODE

REPO_ROOT = Path(__file__).resolve().parents[2]
HOSTILE_WHOLE = ["1_000", "١٢", " 12", "12 ", "0x10", "1e3", "12.0", "+12", "-0", "²", "99999999999999999999"]
HOSTILE_NUMBER = ["nan", "inf", "-inf", "Infinity", "1_0", "١", " 1", "0x10", "1e999", "-0", "1,5"]
HOSTILE_FLAG_ONLY = [""]  # an empty variable is an unset one; an empty flag is a value
# (command, flag, variable or None, kind)
SETTINGS = [
    *[
        ("worker", flag, "OPENLORA_" + flag[2:].replace("-", "_").upper(), "whole")
        for flag in (
            "--max-lora-rank",
            "--num-adapter-slots",
            "--kv-cache-bytes",
            "--num-kv-blocks",
            "--max-num-seqs",
            "--max-model-len",
            "--host-cache-bytes",
            "--disk-cache-bytes",
            "--max-waiting",
            "--max-connections",
            "--max-pending-merges-per-tenant",
            "--max-streams-per-tenant",
            "--max-tokens-limit",
            "--metrics-port",
        )
    ],
    ("worker", "--drain-grace-s", "OPENLORA_DRAIN_GRACE_S", "number"),
    ("worker", "--auth-cache-ttl-s", "OPENLORA_AUTH_CACHE_TTL_S", "number"),
    ("worker", "--request-id-reservation-s", "OPENLORA_REQUEST_ID_RESERVATION_S", "number"),
    *[
        ("up", flag, "OPENLORA_" + flag[2:].replace("-", "_").upper(), "whole")
        for flag in ("--port", "--admin-port", "--http-port", "--metrics-port", "--admin-metrics-port")
    ],
    ("up", "--drain-grace-s", "OPENLORA_DRAIN_GRACE_S", "number"),
    ("control-plane", "--metrics-port", "OPENLORA_METRICS_PORT", "whole"),
    ("control-plane", "--max-connections", "OPENLORA_MAX_CONNECTIONS", "whole"),
    ("control-plane", INTERVAL_FLAG, "OPENLORA_PREDICTOR_INTERVAL_S", "number"),
    *[("control-plane", s.flag, s.env, "whole" if s.integer else "number") for s in PREDICTOR_FLAGS],
    ("generate", "--max-tokens", None, "whole"),
    ("generate", "--top-k", None, "whole"),
    ("generate", "--temperature", None, "number"),
    ("generate", "--top-p", None, "number"),
    ("generate", "--density", None, "number"),
    ("prices", "--prompt", None, "whole"),
    ("prices", "--completion", None, "whole"),
    ("adapters", "--royalty", None, "whole"),
    ("mixes", "--density", None, "number"),
]


def _argv(command: str, tmp_path: Path) -> list[str]:
    """`command` with what it needs besides the setting tried, so that only that setting can be refused
    (and, were it taken, nothing would start: `up` gets a tenant it refuses, after every number)."""
    return {
        "worker": [
            "worker", "--model", str(tmp_path / "no-model"), "--state-dir", str(tmp_path / "state"),
            "--control-plane", "127.0.0.1:9", "--worker-token", "t" * 20,
        ],
        "up": ["up", "--state-dir", str(tmp_path / "state"), "--tenant", "no tenant"],
        # contradictory flags: refused after every number is read, were one taken
        "control-plane": ["control-plane", "--state-dir", str(tmp_path / "state"), "--no-migrate", "--migrate-only"],
        "generate": ["generate", "hello"],
        "prices": ["prices", "set", "tiny", "--prompt", "1", "--completion", "1"],
        "adapters": ["adapters", "push", str(tmp_path), "--name", "a"],
        "mixes": ["mixes", "create", "m", "--mix", "a=1"],
    }[command]  # fmt: skip


def _run(argv: list[str], monkeypatch, capsys, env: dict[str, str] | None = None) -> tuple[int, str]:
    """`openlora ARGV` in this process with only `env` of the OPENLORA_* variables: (exit status, stderr)."""
    for name in [n for n in os.environ if n.startswith("OPENLORA_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", os.devnull)  # no context file: devnull is no directory
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    try:
        code = main(argv)
    except SystemExit as exited:  # argparse's refusal of a flag's value
        code = exited.code
    return code, capsys.readouterr().err


def _cases():
    for command, flag, variable, kind in SETTINGS:
        values = HOSTILE_WHOLE if kind == "whole" else HOSTILE_NUMBER
        for value in [*values, *HOSTILE_FLAG_ONLY]:
            yield pytest.param(command, flag, None, value, id=f"{command} {flag} {value!r}")
        if variable is not None:
            for value in values:
                yield pytest.param(command, flag, variable, value, id=f"{command} {variable}={value!r}")


@pytest.mark.parametrize(("command", "flag", "variable", "value"), list(_cases()))
def test_a_hostile_number_is_refused_naming_its_flag_and_variable(
    tmp_path, monkeypatch, capsys, command, flag, variable, value
):
    argv = _argv(command, tmp_path)
    if variable is None:
        code, err = _run([*argv, f"{flag}={value}"], monkeypatch, capsys)
    else:
        code, err = _run(argv, monkeypatch, capsys, {variable: value})
    assert code == CONFIG_ERROR_EXIT_CODE, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert flag in lines[0] and repr(value) in lines[0], err
    assert variable is None or variable in lines[0], err
    assert "must be a" in lines[0], err  # says what is taken
    if value == "1e999":  # written as the rule asks, too large: not told to write it otherwise
        assert "past the largest one" in lines[0] and "notation" not in lines[0], err
    assert not (tmp_path / "state").exists()  # nothing started


@pytest.mark.parametrize(
    ("command", "variable", "value", "named"),
    [
        ("worker", "OPENLORA_QUANTIZE_LM_HEAD", "ture", "--quantize-lm-head"),
        ("worker", "OPENLORA_QUANTIZE_LM_HEAD", " on", "--quantize-lm-head"),
        ("worker", "OPENLORA_HTTP_METRICS", "yes please", "--http-metrics"),
        ("worker", "OPENLORA_HTTP_METRICS", "ｙｅｓ", "--http-metrics"),
        ("worker", "OPENLORA_QUANTIZE", " int4", "--quantize"),
        ("worker", "OPENLORA_QUANTIZE", "ｉｎｔ4", "--quantize"),
        ("up", "OPENLORA_QUANTIZE", "int4\n", "--quantize"),
        ("worker", "OPENLORA_DEVICE", "cuda ", "--device"),
        ("worker", "OPENLORA_DEVICE", "cuda:١", "--device"),
        ("up", "OPENLORA_DEVICE", "ＣＰＵ", "--device"),
        ("worker", "OPENLORA_DEVICE", "CUDA:x", "--device"),  # quoted as typed, not lowered
        ("worker", "OPENLORA_DTYPE", " float32", "--dtype"),
        ("worker", "OPENLORA_LOG_LEVEL", "ınfo", "--log-level"),  # "ı".upper() is "I"
        ("control-plane", "OPENLORA_LOG_LEVEL", " INFO", "--log-level"),
        ("worker", "OPENLORA_KERNELS", "reference ", "OPENLORA_KERNELS"),
    ],
)
def test_a_word_that_is_not_one_of_the_settings_words_is_refused_naming_it(
    tmp_path, monkeypatch, capsys, command, variable, value, named
):
    code, err = _run(_argv(command, tmp_path), monkeypatch, capsys, {variable: value})
    assert code == CONFIG_ERROR_EXIT_CODE, err
    assert "Traceback" not in err
    line = next(line for line in err.splitlines() if "error:" in line)
    assert named in line and variable in line and repr(value) in line, err
    assert not (tmp_path / "state").exists()


def test_a_mix_weight_is_read_as_a_number_by_the_same_rule(tmp_path, monkeypatch, capsys):
    for weight in ("1_0", "nan", "١", "0x1"):
        for command in ("mixes", "generate"):
            argv = _argv(command, tmp_path)
            code, err = _run([*argv, f"--mix=a={weight}"], monkeypatch, capsys)
            assert code == CONFIG_ERROR_EXIT_CODE and "mix weight of 'a' must be a number" in err, err


def test_documented_values_are_still_taken(tmp_path, monkeypatch):
    """The README's examples, other cases of the named choices, and the notations of numbers."""
    from openlora.cli import build_parser
    from openlora.commands.serving import up_config_from_args, worker_config_from_args
    from openlora.config import ControlPlaneSettings

    env = {
        "OPENLORA_PORT": "50062",
        "OPENLORA_ADMIN_PORT": "50061",
        "OPENLORA_HTTP_PORT": "8010",
        "OPENLORA_DRAIN_GRACE_S": "1e-3",
        "OPENLORA_QUANTIZE": "INT8",
        "OPENLORA_QUANTIZE_LM_HEAD": "True",
        "OPENLORA_DEVICE": "CPU",
        "OPENLORA_LOG_LEVEL": "debug",
        "OPENLORA_KERNELS": "Reference",
        "OPENLORA_HTTP_METRICS": "",  # empty: unset
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    up = up_config_from_args(build_parser().parse_args(["up", "--state-dir", str(tmp_path)]), env)
    assert (up.port, up.admin_port, up.http_port, up.drain_grace_s) == (50062, 50061, 8010, 0.001)
    assert (up.quantize, up.quantize_lm_head, up.device, up.log_level) == ("int8", True, "cpu", "DEBUG")
    worker_argv = [
        "worker", "--model", str(tmp_path), "--control-plane", "cp:1", "--worker-token", "t" * 20,
        "--max-num-seqs", "010", "--kv-cache-bytes", "268435456", "--auth-cache-ttl-s", ".5",
        "--drain-grace-s", "5.", "--dtype", "BFloat16", "--http-metrics",
    ]  # fmt: skip
    worker = worker_config_from_args(build_parser().parse_args(worker_argv))
    assert (worker.engine.max_num_seqs, worker.engine.kv_cache_bytes) == (10, 256 << 20)
    assert (worker.auth_cache_ttl_s, worker.drain_grace_s, worker.engine.dtype) == (0.5, 5.0, "bfloat16")
    assert worker.http_metrics and worker.engine.quantize == "int8"
    flags = vars(
        build_parser().parse_args(
            ["control-plane", "--predictor-interval-s", "0", "--predictor-lead-share", "0.2",
             "--predictor-min-gaps", "3", "--metrics-port", "0"]
        )
    )  # fmt: skip
    settings = ControlPlaneSettings.resolve(flags, {"OPENLORA_MAX_CONNECTIONS": "4096"})
    assert (settings.predictor_interval_s, settings.predictor.lead_gap_share) == (0.0, 0.2)
    assert (settings.predictor.min_gaps, settings.max_connections, settings.metrics_port) == (3, 4096, 0)
    generate = build_parser().parse_args(
        ["generate", "--seed", "-1", "--top-p", "1", "--temperature", "0", "--density", "1e-4",
         "--mix", "a=0.6,b=-0.4", "hi"]
    )  # fmt: skip
    assert (generate.seed, generate.top_p, generate.density) == ((1 << 64) - 1, 1.0, 1e-4)
    assert generate.mix == [("a", 0.6), ("b", -0.4)]


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (["worker", "--model", "m", "--control-plane", "cp:1"], {"OPENLORA_MAX_WAITING": "1_000"}, "OPENLORA_MAX_WAITING"),
        (["control-plane", "--no-migrate"], {"OPENLORA_METRICS_PORT": "١٢"}, "OPENLORA_METRICS_PORT"),
        (["up", "--port", " 12"], {}, "--port"),
    ],
)  # fmt: skip
def test_the_console_command_exits_with_the_config_error_status(tmp_path, argv, env, named):
    run_env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OPENLORA_CONTEXT": str(tmp_path / "c.json")}
    result = subprocess.run(
        [sys.executable, "-m", "openlora.cli", *argv], env={**run_env, **env}, capture_output=True,
        text=True, timeout=120, cwd=REPO_ROOT,
    )  # fmt: skip
    assert result.returncode == CONFIG_ERROR_EXIT_CODE
    assert "Traceback" not in result.stderr and named in result.stderr
