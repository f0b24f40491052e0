"""Generated operator keys and worker tokens (`up`'s, the control plane's) never start with "-": a bare token_urlsafe does one time
in 64, and `openlora ... --api-key -xyz` is then read as a flag (a CI run of the up restart test hit it)."""

from __future__ import annotations

import secrets

from openlora import config
from openlora.commands import up


def test_generated_secrets_never_read_as_a_flag(tmp_path, monkeypatch):
    monkeypatch.setattr(secrets, "token_urlsafe", lambda n: "-" + "x" * 42)
    keys = up._load_secrets(tmp_path)
    token = config.ControlPlaneSettings.resolve(
        {"state_dir": str(tmp_path / "cp")}, {}
    ).worker_token_or_stored()
    for secret in (keys["admin_key"], keys["worker_token"], token):
        assert not secret.startswith("-") and secret.endswith("-" + "x" * 42)
