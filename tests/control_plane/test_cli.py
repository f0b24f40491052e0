"""The admin commands of `openlora` against an in-process control plane, and `control-plane` migrations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from control_plane.db.migrate import current_revision, head_revision
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
    code, out, _ = _run(capsys, cp, "usage", key=secret)
    assert code == 0 and "TOTAL" in out
    code, out, _ = _run(
        capsys, cp, "prices", "set", "tiny-llama", "--prompt", "100000", "--completion", "300000"
    )
    assert code == 0
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


def test_money_is_printed_exactly() -> None:
    assert [money(m) for m in (0, 5988, -4960, 12_345_678)] == [
        "0.000000",
        "0.005988",
        "-0.004960",
        "12.345678",
    ]
