"""The line `up` prints after `ready` ("in another terminal try: ...") must work as printed."""

from __future__ import annotations

import shlex

from openlora.commands.up import _context_prefix


def test_the_try_hint_names_a_context_file_the_cli_would_not_read(tmp_path, monkeypatch):
    """`up --context FILE` wrote its endpoints and key to FILE, but the hint's command read the default
    context file and failed (connection refused, or another system's key)."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("OPENLORA_CONTEXT", raising=False)
    monkeypatch.chdir(tmp_path)
    assert _context_prefix(tmp_path / "xdg" / "openlora" / "context.json") == ""
    other = tmp_path / "my context.json"
    prefix = _context_prefix(other)
    assert prefix == f"OPENLORA_CONTEXT={shlex.quote('my context.json')} "
    monkeypatch.setenv("OPENLORA_CONTEXT", str(other))  # the shell already points the CLI there
    assert _context_prefix(other) == ""
