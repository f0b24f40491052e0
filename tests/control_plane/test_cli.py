"""The admin commands of `openlora` against an in-process control plane, and `control-plane` migrations."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pytest

from control_plane.db.migrate import current_revision, head_revision, upgrade
from openlora.cli import main, money
from openlora.config import AdminSettings, ControlPlaneSettings


def _run(capsys, cp, *argv: str, key: str | None = None, environ: dict | None = None) -> tuple[int, str, str]:
    flags = ["--admin-target", cp.target, "--api-key", key or cp.admin_key]
    code = main([*argv, *flags], environ=environ or {})
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_admin_workflow_prints_tables(capsys, cp, adapters_root) -> None:
    code, out, _ = _run(capsys, cp, "tenants", "create", "cli-co")
    assert code == 0 and "cli-co" in out
    code, out, _ = _run(capsys, cp, "keys", "create", "--tenant", "cli-co", "--admin")
    assert code == 0
    secret = out.split("secret (shown once): ")[1].strip()
    code, out, _ = _run(
        capsys, cp, "adapters", "push", str(adapters_root / "a"), "--name", "cli-lora", key=secret
    )
    assert code == 0 and "cli-lora" in out and "cli-co" in out and "private" in out
    code, out, _ = _run(capsys, cp, "adapters", "list", key=secret)
    assert code == 0 and out.splitlines()[0].split()[:2] == ["NAME", "TENANT"] and "cli-lora" in out
    code, out, _ = _run(
        capsys, cp, "adapters", "push", str(adapters_root / "a"), "--name", "cli-paid", "--royalty", "2500000",
        "--keep-warm", key=secret,
    )  # fmt: skip
    assert code == 0
    code, out, _ = _run(capsys, cp, "adapters", "list", key=secret)
    header, *rows = out.splitlines()
    assert header.split()[-3:] == ["ROYALTY/M", "KEEP", "WARM"]
    listed = {row.split()[0]: row.split()[-2:] for row in rows}
    assert listed["cli-paid"] == ["2.500000", "yes"] and listed["cli-lora"] == ["0.000000", "no"]
    code, out, _ = _run(capsys, cp, "usage", key=secret)
    assert code == 0 and "TOTAL" in out
    code, out, _ = _run(
        capsys, cp, "prices", "set", "tiny-llama", "--prompt", "100000", "--completion", "300000"
    )
    assert code == 0
    code, _, err = _run(capsys, cp, "prices", "set", "tiny-lama", "--prompt", "1", "--completion", "1")
    assert code == 0 and "no worker has registered base model 'tiny-lama'" in err and "tiny-llama" in err
    code, out, _ = _run(capsys, cp, "invoice", "--tenant", "cli-co", "--period", "2026-01")
    assert code == 0 and "0.000000" in out
    code, out, _ = _run(capsys, cp, "adapters", "rm", "cli-lora", key=secret)
    assert code == 0 and "deleted cli-lora" in out
    code, out, _ = _run(capsys, cp, "adapters", "list", key=secret)
    assert "cli-lora" not in out


def test_errors_are_reported_with_their_status_and_exit_code(capsys, cp, adapters_root, tmp_path) -> None:
    code, _, err = _run(capsys, cp, "tenants", "create", "x", key="olk_0123456789ab_" + "z" * 30)
    assert code == 1 and "UNAUTHENTICATED" in err
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (bad / name).write_bytes((adapters_root / "a" / name).read_bytes())
    (bad / "adapter_model.bin").write_bytes(b"\x80")
    code, _, err = _run(capsys, cp, "adapters", "push", str(bad), "--name", "bad")
    assert code == 2 and "pickle" in err


def test_context_file_and_environment_fill_missing_flags(capsys, cp, tmp_path: Path) -> None:
    context = tmp_path / "context.json"
    context.write_text(json.dumps({"admin_target": cp.target, "api_key": cp.admin_key}))
    assert main(["adapters", "list"], environ={"OPENLORA_CONTEXT": str(context)}) == 0
    assert "NAME" in capsys.readouterr().out
    settings = AdminSettings.resolve(
        None,
        "flag-key",
        {"OPENLORA_API_KEY": "env-key", "OPENLORA_ADMIN_TARGET": "env:1"},
        {"api_key": "ctx"},
    )
    assert settings == AdminSettings("env:1", "flag-key")
    assert (
        AdminSettings.resolve(None, None, {"OPENLORA_API_KEY": "env-key"}, {"admin_target": "c:1"}).api_key
        == "env-key"
    )
    with pytest.raises(ValueError, match="OPENLORA_ADMIN_TARGET"):
        AdminSettings.resolve(None, "k", {}, {})


def test_an_exported_admin_key_sent_over_the_context_files_key_is_said(capsys, cp, tmp_path: Path) -> None:
    """With OPENLORA_ADMIN_KEY exported (to run a control plane) and a context file from `up`, admin commands
    sent the operator key and listed the operator tenant's (empty) adapters without a word of why."""
    context = tmp_path / "context.json"
    context.write_text(json.dumps({"admin_target": cp.target, "api_key": "olk_0123456789ab_" + "c" * 30}))
    environ = {"OPENLORA_CONTEXT": str(context), "OPENLORA_ADMIN_KEY": cp.admin_key}
    assert main(["adapters", "list"], environ=environ) == 0
    assert "note: OPENLORA_ADMIN_KEY is set" in capsys.readouterr().err
    for quiet in (
        {**environ, "OPENLORA_API_KEY": cp.admin_key},  # a key chosen for the command
        {"OPENLORA_CONTEXT": str(context), "OPENLORA_ADMIN_KEY": cp.admin_key, "unused": ""},
    ):
        argv = ["adapters", "list"] + (["--api-key", cp.admin_key] if "unused" in quiet else [])
        assert main(argv, environ=quiet) == 0
        assert "note:" not in capsys.readouterr().err
    context.write_text(json.dumps({"admin_target": cp.target, "api_key": cp.admin_key}))  # the same key
    assert main(["adapters", "list"], environ=environ) == 0
    assert "note:" not in capsys.readouterr().err


def test_a_revoked_context_key_is_explained(capsys, cp, tmp_path: Path) -> None:
    """The context file's key revoked (or the file left by another system): the command said only
    'unknown or revoked api key', leaving a newcomer to guess where that key came from."""
    with_key = main(
        ["keys", "create", "--tenant", "operator", "--admin-target", cp.target, "--api-key", cp.admin_key]
    )
    assert with_key == 0
    secret = capsys.readouterr().out.split("secret (shown once): ")[1].strip()
    context = tmp_path / "context.json"
    context.write_text(json.dumps({"admin_target": cp.target, "api_key": secret}))
    assert main(["keys", "revoke", secret, "--admin-target", cp.target, "--api-key", cp.admin_key]) == 0
    capsys.readouterr()
    assert main(["adapters", "list"], environ={"OPENLORA_CONTEXT": str(context)}) == 1
    err = capsys.readouterr().err
    assert "UNAUTHENTICATED" in err and f"context file {context}" in err and "openlora up" in err
    assert (
        main(
            ["adapters", "list", "--api-key", "olk_000000000000_x"],
            environ={"OPENLORA_CONTEXT": str(context)},
        )
        == 1
    )
    assert "context file" not in capsys.readouterr().err  # a key passed by flag: no such hint


def test_control_plane_settings_resolution(tmp_path: Path) -> None:
    settings = ControlPlaneSettings.resolve(
        {"listen": None, "database_url": "postgresql://flag/db", "state_dir": str(tmp_path)},
        {"OPENLORA_DATABASE_URL": "postgresql://env/db", "OPENLORA_REDIS_URL": "redis://env:1/0"},
    )
    assert settings.database_url == "postgresql://flag/db" and settings.redis_url == "redis://env:1/0"
    token = settings.worker_token_or_stored()
    assert (
        settings.worker_token_or_stored() == token
        and (tmp_path / "worker_token").stat().st_mode & 0o777 == 0o600
    )
    with pytest.raises(ValueError):
        ControlPlaneSettings.resolve({"no_migrate": True, "migrate_only": True}, {})


def test_migrate_only_applies_and_no_migrate_refuses_a_behind_schema(
    capsys, empty_database_url, tmp_path
) -> None:
    base = [
        "control-plane",
        "--database-url",
        empty_database_url,
        "--state-dir",
        str(tmp_path),
        "--worker-token",
        "w" * 20,
    ]
    assert main([*base, "--no-migrate", "--redis-url", "redis://127.0.0.1:1/0"], environ={}) == 2
    assert "--migrate-only" in capsys.readouterr().err
    assert current_revision(empty_database_url) is None
    assert main([*base, "--migrate-only"], environ={}) == 0
    assert current_revision(empty_database_url) == head_revision()


def test_a_schema_a_newer_version_migrated_is_exit_2_in_every_mode(
    capsys, empty_database_url, tmp_path
) -> None:
    """It was a traceback about a missing script (exit 1, restarted by `up`) when migrating, and advice to
    run --migrate-only (which cannot help) with --no-migrate."""
    upgrade(empty_database_url)
    with psycopg.connect(empty_database_url, autocommit=True) as connection:
        connection.execute("UPDATE alembic_version SET version_num = '0099'")
    base = [
        "control-plane",
        "--database-url",
        empty_database_url,
        "--state-dir",
        str(tmp_path),
        "--worker-token",
        "w" * 20,
        "--listen",
        "127.0.0.1:0",
        "--redis-url",
        "redis://127.0.0.1:1/0",
    ]
    for mode in (["--migrate-only"], ["--no-migrate"], []):
        assert main([*base, *mode], environ={}) == 2, mode
        err = capsys.readouterr().err
        assert "error: database schema is at revision 0099, which this version does not know" in err, mode
        assert "--migrate-only" not in err
    assert current_revision(empty_database_url) == "0099"


def test_money_is_printed_exactly() -> None:
    assert [money(m) for m in (0, 5988, -4960, 12_345_678)] == [
        "0.000000",
        "0.005988",
        "-0.004960",
        "12.345678",
    ]


# ------------------------------------------------------------------------------- predictor settings

# Every predictor setting at a value other than its default: flag text -> PredictorConfig field value.
PREDICTOR_VALUES = {
    "--predictor-rate-window-s": ("rate_time_constant_s", "1200", 1200.0),
    "--predictor-lead-s": ("lead_s", "30", 30.0),
    "--predictor-lead-share": ("lead_gap_share", "0.1", 0.1),
    "--predictor-max-lead-s": ("max_lead_s", "900", 900.0),
    "--predictor-min-gaps": ("min_gaps", "4", 4),
    "--predictor-periodic-tolerance": ("periodic_tolerance", "0.1", 0.1),
    "--predictor-periodic-min-share": ("periodic_min_share", "0.6", 0.6),
    "--predictor-hot-rate-per-s": ("resident_rate_per_s", "2", 2.0),
    "--predictor-burst-gap-factor": ("burst_gap_factor", "3", 3.0),
    "--predictor-cold-rate-per-s": ("demote_below_per_s", "0.0001", 0.0001),
    "--predictor-history-s": ("history_s", "86400", 86400.0),
}
WORKER_TOKEN = "w" * 24


def _control_plane_config(argv: list[str], environ: dict[str, str]):
    """The ControlPlaneConfig `openlora control-plane ARGV` would serve with, through the real parser."""
    from openlora.cli import build_parser

    args = build_parser().parse_args(["control-plane", *argv])
    settings = ControlPlaneSettings.resolve(vars(args), {"OPENLORA_WORKER_TOKEN": WORKER_TOKEN, **environ})
    return settings.to_config("postgresql://x/y", None)


def test_every_predictor_flag_is_listed_with_its_variable_in_the_help() -> None:
    from control_plane.prediction.demand import FIELD_NAMES
    from control_plane.prediction.settings import PREDICTOR_FLAGS
    from openlora.cli import build_parser

    assert sorted(s.field for s in PREDICTOR_FLAGS) == sorted(FIELD_NAMES)  # no setting left without a flag
    subparsers = build_parser()._subparsers._group_actions[0].choices
    for command in ("control-plane", "up"):
        text = subparsers[command].format_help()
        for setting in PREDICTOR_FLAGS:
            assert setting.flag in text and setting.env in text, (command, setting.flag)


def test_predictor_flags_reach_the_predictor_config() -> None:
    argv = [f"{flag}={text}" for flag, (_, text, _) in PREDICTOR_VALUES.items()]
    config = _control_plane_config([*argv, "--predictor-interval-s", "60"], {})
    assert config.predictor_interval_s == 60.0
    for flag, (field, _, value) in PREDICTOR_VALUES.items():
        assert getattr(config.predictor, field) == value, flag


def test_predictor_variables_fill_in_for_flags_and_flags_win() -> None:
    from control_plane.prediction.demand import PredictorConfig
    from control_plane.prediction.settings import PREDICTOR_FLAGS

    envs = {s.flag: s.env for s in PREDICTOR_FLAGS}
    environ = {envs[flag]: text for flag, (_, text, _) in PREDICTOR_VALUES.items()}
    environ["OPENLORA_PREDICTOR_INTERVAL_S"] = "30"
    config = _control_plane_config([], environ)
    assert config.predictor_interval_s == 30.0
    for flag, (field, _, value) in PREDICTOR_VALUES.items():
        assert getattr(config.predictor, field) == value, flag
    flagged = _control_plane_config(["--predictor-lead-s", "45", "--predictor-interval-s", "2"], environ)
    assert flagged.predictor.lead_s == 45.0 and flagged.predictor_interval_s == 2.0
    assert flagged.predictor.history_s == 86400.0  # the others still from the environment
    assert _control_plane_config([], {}).predictor == PredictorConfig()


@pytest.mark.parametrize(
    ("flag", "text"),
    [
        ("--predictor-rate-window-s", "0"),
        ("--predictor-rate-window-s", "nan"),
        ("--predictor-lead-s", "-1"),
        ("--predictor-lead-s", "inf"),
        ("--predictor-lead-share", "1"),
        ("--predictor-max-lead-s", "-inf"),
        ("--predictor-min-gaps", "1"),
        ("--predictor-min-gaps", "2.5"),
        ("--predictor-periodic-tolerance", "0.5"),
        ("--predictor-periodic-tolerance", "0"),
        ("--predictor-periodic-min-share", "1.5"),
        ("--predictor-hot-rate-per-s", "0"),
        ("--predictor-burst-gap-factor", "-2"),
        ("--predictor-cold-rate-per-s", "-0.1"),
        ("--predictor-history-s", "0"),
        ("--predictor-history-s", "soon"),
        ("--predictor-interval-s", "-1"),
        ("--predictor-interval-s", "nan"),
        # Accepted before, then fatal: a wait past threading.TIMEOUT_MAX killed the predictor's thread, a
        # horizon before year 1 failed every pass, a 400-digit integer raised OverflowError (exit 1).
        ("--predictor-interval-s", "1e10"),
        ("--predictor-history-s", "1e11"),
        ("--predictor-min-gaps", "1" + "0" * 400),
    ],
)
def test_bad_predictor_value_is_refused_naming_the_flag(capsys, tmp_path, flag, text) -> None:
    argv = ["control-plane", "--database-url", "postgresql://127.0.0.1:1/none", "--state-dir", str(tmp_path)]
    assert main([*argv, f"{flag}={text}"], environ={}) == 2  # refused before anything starts
    err = capsys.readouterr().err
    assert flag in err and repr(text) in err
    with pytest.raises(ValueError, match=flag):
        _control_plane_config([], {"OPENLORA_" + flag.removeprefix("--").replace("-", "_").upper(): text})


def test_an_empty_predictor_flag_is_refused_not_read_as_not_given(capsys, tmp_path) -> None:
    """`--predictor-rate-window-s=` served the default (or the variable); an empty variable still means
    unset, as for every OPENLORA_* variable."""
    argv = ["control-plane", "--database-url", "postgresql://127.0.0.1:1/none", "--state-dir", str(tmp_path)]
    assert main([*argv, "--predictor-rate-window-s="], environ={}) == 2
    assert "--predictor-rate-window-s" in capsys.readouterr().err


def test_contradicting_predictor_values_are_refused_naming_both_flags() -> None:
    with pytest.raises(ValueError, match=r"--predictor-max-lead-s.*--predictor-lead-s"):
        _control_plane_config(["--predictor-lead-s", "700"], {})  # above the default max lead of 600
    with pytest.raises(ValueError, match=r"OPENLORA_PREDICTOR_COLD_RATE_PER_S.*--predictor-hot-rate-per-s"):
        _control_plane_config(
            ["--predictor-hot-rate-per-s", "0.01"], {"OPENLORA_PREDICTOR_COLD_RATE_PER_S": "0.1"}
        )


def test_up_hands_its_predictor_flags_to_the_control_plane(tmp_path) -> None:
    from openlora.cli import build_parser
    from openlora.commands.serving import up_config_from_args

    argv = [f"{flag}={text}" for flag, (_, text, _) in PREDICTOR_VALUES.items()]
    args = build_parser().parse_args(
        ["up", "--state-dir", str(tmp_path), "--predictor-interval-s", "60", *argv]
    )
    up = up_config_from_args(args, {})
    # The control plane child parses what `up` hands it, as `up` would start it.
    config = _control_plane_config(list(up.control_plane_args), {})
    assert config.predictor_interval_s == 60.0
    for flag, (field, _, value) in PREDICTOR_VALUES.items():
        assert getattr(config.predictor, field) == value, flag
    plain = up_config_from_args(build_parser().parse_args(["up", "--state-dir", str(tmp_path)]), {})
    assert plain.control_plane_args == ()  # the child falls back to the same environment


def test_up_refuses_a_bad_predictor_value_before_starting_anything(capsys, tmp_path) -> None:
    state_dir = tmp_path / "state"
    assert main(["up", "--state-dir", str(state_dir), "--predictor-hot-rate-per-s", "-1"], environ={}) == 2
    assert "--predictor-hot-rate-per-s" in capsys.readouterr().err
    assert not state_dir.exists()


def test_an_address_nothing_answers_at_is_reported_with_a_hint(capsys) -> None:
    """After `openlora up` stopped, the context file still names its address: the raw gRPC error ("failed to
    connect to all addresses") came with no word of what to do."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    code = main(["adapters", "list", "--admin-target", f"127.0.0.1:{port}", "--api-key", "k"], environ={})
    err = capsys.readouterr().err
    assert code == 1 and "UNAVAILABLE" in err and "is `openlora up`" in err


def test_a_push_over_an_adapter_of_the_same_name_says_it_replaced_it(capsys, cp, adapters_root) -> None:
    """Replacing an adapter by pushing other content under its name printed only the table (or "identical
    content was already stored"), nothing to say the adapter now serves something else."""
    _run(capsys, cp, "tenants", "create", "cli-swap")
    argv = ["adapters", "push", "--name", "swap", "--tenant", "cli-swap"]
    code, out, _ = _run(capsys, cp, *argv[:2], str(adapters_root / "a"), *argv[2:])
    assert code == 0 and "replaced" not in out
    first = next(line.split()[5] for line in out.splitlines() if line.startswith("swap "))
    code, out, _ = _run(capsys, cp, *argv[:2], str(adapters_root / "b"), *argv[2:])
    assert code == 0 and f"replaced swap: it served content {first} until now" in out
    code, out, _ = _run(capsys, cp, *argv[:2], str(adapters_root / "b"), *argv[2:])
    assert code == 0 and "replaced" not in out  # the same content again: nothing was replaced


@pytest.mark.parametrize("value", [str(2**63), str(-(2**63) - 1), "1e3", "0x10", "nan", ""])
@pytest.mark.parametrize("flag", ["--royalty", "--prompt", "--completion"])
def test_a_rate_past_int64_or_not_a_whole_number_is_refused_naming_its_flag(
    capsys, cp, adapters_root, flag, value
) -> None:
    """A rate past int64 was refused as the request was built, naming the request's field
    (royalty_micros_per_million_tokens) and not the flag it came from."""
    if flag == "--royalty":
        argv = ["adapters", "push", str(adapters_root / "a"), "--name", "rate", flag, value]
    else:
        other = "--completion" if flag == "--prompt" else "--prompt"
        argv = ["prices", "set", "tiny-llama", other, "1", flag, value]
    with pytest.raises(SystemExit) as exited:
        _run(capsys, cp, *argv)
    assert exited.value.code == 2
    assert f"argument {flag}: " in capsys.readouterr().err


@pytest.mark.parametrize("level", ["debug", "INFO", "Warning", "ERROR", "critical"])
def test_every_long_running_command_takes_every_named_log_level(tmp_path, level) -> None:
    """CRITICAL was refused by the worker, and `control-plane` and `up` logged at INFO whatever
    OPENLORA_LOG_LEVEL said: `up` now hands its level to both children."""
    from openlora.cli import build_parser
    from openlora.commands.serving import up_config_from_args

    want = level.strip().upper()
    flags = vars(build_parser().parse_args(["control-plane", "--log-level", level]))
    assert ControlPlaneSettings.resolve(flags, {}).log_level == want
    unflagged = vars(build_parser().parse_args(["control-plane"]))
    assert ControlPlaneSettings.resolve(unflagged, {"OPENLORA_LOG_LEVEL": level}).log_level == want
    assert ControlPlaneSettings.resolve(unflagged, {}).log_level == "INFO"
    up = up_config_from_args(
        build_parser().parse_args(["up", "--state-dir", str(tmp_path)]), {"OPENLORA_LOG_LEVEL": level}
    )
    assert up.log_level == want


@pytest.mark.parametrize(
    "command", [["control-plane"], ["up"], ["worker", "--model", "m", "--control-plane", "h:1"]]
)
def test_an_unknown_log_level_stops_every_command_naming_its_flag_and_variable(
    capsys, monkeypatch, tmp_path, command
) -> None:
    monkeypatch.setenv("OPENLORA_LOG_LEVEL", "loud")  # `worker` and `up` read the process's environment
    state_dir = tmp_path / "state"
    argv = [*command, "--state-dir", str(state_dir)]
    assert main(argv, environ={"OPENLORA_LOG_LEVEL": "loud"}) == 2
    err = capsys.readouterr().err
    assert (
        "--log-level (OPENLORA_LOG_LEVEL) must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'loud'"
        in err
    )
    assert not state_dir.exists()


@pytest.mark.parametrize(
    ("variables", "words"),
    [
        (
            {"OPENLORA_KERNELS": "fast"},
            "OPENLORA_KERNELS must be one of auto, triton, reference, got 'fast'",
        ),
        ({"OPENLORA_KERNELS": "triton"}, "OPENLORA_KERNELS=triton needs --device cuda"),
    ],
)
def test_up_refuses_a_kernel_setting_its_worker_would_refuse_before_starting_anything(
    capsys, monkeypatch, tmp_path, variables, words
) -> None:
    """The worker child refused these only once `up` had started its databases and the control plane."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)  # `up` reads the process's environment, as its children do
    state_dir = tmp_path / "state"
    assert main(["up", "--state-dir", str(state_dir)], environ=variables) == 2
    assert words in capsys.readouterr().err
    assert not state_dir.exists()


def test_an_adapter_file_that_cannot_be_read_is_refused_naming_it_before_any_call(
    capsys, cp, adapters_root, tmp_path
) -> None:
    """A directory named adapter_config.json (or a file that cannot be opened) failed once the upload stream
    had started, as `UNKNOWN: Exception iterating requests!`, naming no file; against an address where
    nothing answers, a directory that cannot be sent was reported as UNAVAILABLE."""
    adapter = tmp_path / "adapter"
    (adapter / "adapter_config.json").mkdir(parents=True)
    weights = (adapters_root / "a" / "adapter_model.safetensors").read_bytes()
    (adapter / "adapter_model.safetensors").write_bytes(weights)
    code, _, err = _run(capsys, cp, "adapters", "push", str(adapter), "--name", "unreadable")
    assert code == 2
    assert err == f"error: {adapter / 'adapter_config.json'} is not a regular file\n"
    code = main(
        ["adapters", "push", str(adapter), "--name", "unreadable", "--admin-target", "127.0.0.1:1",
         "--api-key", cp.admin_key],
        environ={},
    )  # fmt: skip
    assert code == 2 and "is not a regular file" in capsys.readouterr().err
