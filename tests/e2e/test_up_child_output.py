"""What `up` logs when one of its children exits: only that run's output, the flag of `up` that moves an
address the child could not listen on, and a refusal of its flags while `up` waits for it ends the wait."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

from openlora.commands.supervise import Child, ConfigRefused, Supervisor
from openlora.commands.up import _wait_serving
from openlora.listen import listen_error


def _child(tmp_path: Path, code: str, listen_hints: dict[str, str] | None = None) -> Child:
    return Child(
        "worker", [sys.executable, "-c", code], dict(os.environ), tmp_path / "worker.log", listen_hints
    )


def _exited(child: Child) -> Child:
    child.process.wait(30)
    return child


def test_the_tail_of_a_child_shows_only_the_lines_of_its_own_run(tmp_path):
    (tmp_path / "worker.log").write_text("a line of an earlier run\n")
    children = [_exited(_child(tmp_path, "print('this run'); raise SystemExit(1)"))]
    try:
        assert children[0].tail() == "this run"
        children.append(_exited(children[0].restarted()))
        assert children[1].tail() == "this run"
        assert (tmp_path / "worker.log").read_text().count("this run") == 2
    finally:
        for child in children:
            child.stop(5)


def test_a_run_whose_last_words_had_no_newline_leaves_the_next_runs_first_line_whole(tmp_path):
    """A worker's interpreter prints a library's leak report at exit without a final newline: the next
    run's first log line was glued to its end."""
    children = [_exited(_child(tmp_path, "import sys; sys.stdout.write('last words'); raise SystemExit(1)"))]
    try:
        children.append(_exited(children[0].restarted()))
        assert children[1].tail() == "last words"  # its own run only
        lines = (tmp_path / "worker.log").read_text().split("\n")
        assert lines == ["last words", "last words"]
        children.append(_exited(children[1].restarted()))  # a log whose last line was ended is left as is
        assert (tmp_path / "worker.log").read_text() == "last words\nlast words\nlast words"
    finally:
        for child in children:
            child.stop(5)


def test_a_child_that_cannot_listen_is_logged_with_the_flag_of_up_that_moves_the_address(tmp_path, caplog):
    error = listen_error("127.0.0.1:50052", "--listen (OPENLORA_LISTEN)")
    hint = "port 50052 (the worker's gRPC inference API) cannot be used; choose another with --port PORT"
    child = _child(tmp_path, f"import sys; print({str(error)!r}, file=sys.stderr); sys.exit(1)", {
        "127.0.0.1:50052": hint,
        "127.0.0.1:8000": "the other address",
    })  # fmt: skip
    children = [_exited(child)]
    supervisor = Supervisor(children)
    try:
        with caplog.at_level(logging.ERROR, logger="openlora.up"):
            supervisor.check()
        (record,) = [r for r in caplog.records if "exited" in r.getMessage()]
        first_line = record.getMessage().splitlines()[0]
        assert first_line.startswith("worker exited (exit 1)") and first_line.endswith(f"; {hint}:")
        assert "the other address" not in record.getMessage()
    finally:
        for each in (child, *children):
            each.stop(5)


def test_a_child_that_refuses_its_flags_while_up_waits_for_it_stops_up(tmp_path, caplog):
    children = [_child(tmp_path, "import sys; print('error: bad flag', file=sys.stderr); sys.exit(2)")]
    try:
        with pytest.raises(ConfigRefused, match="exit 2"), caplog.at_level(logging.ERROR, "openlora.up"):
            _wait_serving("127.0.0.1:9", Supervisor(children), timeout_s=120)  # not a TimeoutError
        assert "error: bad flag" in caplog.text
    finally:
        children[0].stop(5)
