"""`openlora worker` and `openlora up` refusing a flag before anything starts: exit 2, the message on
stderr, no traceback, no state dir (shared by the flag tests)."""

from __future__ import annotations

from pathlib import Path

from openlora.commands.serving import main

# A worker's flags beside the one tried, so that only that one can be refused.
WORKER_REQUIRED = ["--control-plane", "cp:1", "--worker-token", "t" * 20]


def assert_refused_before_start(
    command: str, tmp_path: Path, monkeypatch, capsys, argv, env, message, cleared=()
) -> None:
    """`openlora COMMAND` with `argv`, the variables `env` set and those named in `cleared` unset, exits
    2 (returned, or argparse's exit) with `message` and starts nothing."""
    for name in cleared:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    state_dir = tmp_path / "state"
    if command == "worker":
        flags = ["--model", str(tmp_path), "--state-dir", str(state_dir), *WORKER_REQUIRED]
    else:
        flags = ["--state-dir", str(state_dir), "--context", str(tmp_path / "ctx.json")]
    try:
        code = main([command, *flags, *argv])
    except SystemExit as exited:  # a number flag's value, refused by its argparse type
        code = exited.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert not state_dir.exists()  # nothing was started
