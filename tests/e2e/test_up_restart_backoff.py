"""How `openlora up` starts a dead worker again: the delays it waits, and what it never restarts."""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time
from pathlib import Path

from openlora.commands.up import (
    CONFIG_ERROR_EXIT_CODE,
    RESTART_BACKOFF_MAX_S,
    RESTART_BACKOFF_MIN_S,
    RESTART_BACKOFF_RESET_S,
    Child,
    _Backoff,
    _supervise,
)


def test_restart_delay_doubles_up_to_the_cap_while_workers_die_young():
    backoff = _Backoff()
    delays = [backoff.next_delay_s(ran_s=1.0) for _ in range(10)]
    assert delays[:4] == [RESTART_BACKOFF_MIN_S * 2**i for i in range(4)]
    assert all(b == min(a * 2, RESTART_BACKOFF_MAX_S) for a, b in itertools.pairwise(delays))
    assert delays[-1] == RESTART_BACKOFF_MAX_S


def test_restart_delay_falls_back_to_the_minimum_after_a_long_healthy_run():
    backoff = _Backoff()
    for _ in range(5):
        backoff.next_delay_s(ran_s=1.0)
    assert backoff.next_delay_s(ran_s=RESTART_BACKOFF_RESET_S) == RESTART_BACKOFF_MIN_S
    assert backoff.next_delay_s(ran_s=1.0) == RESTART_BACKOFF_MIN_S * 2


def _child(tmp_path: Path, name: str, code: str) -> Child:
    return Child(name, [sys.executable, "-c", code], dict(os.environ), tmp_path / f"{name}.log")


def test_a_worker_that_refuses_its_configuration_is_not_restarted(tmp_path):
    other = _child(tmp_path, "control-plane", "import time; time.sleep(60)")
    worker = _child(tmp_path, "worker", "import sys; print('error: bad setting'); sys.exit(2)")
    try:
        assert _supervise([other, worker], worker, threading.Event()) == 1
        assert worker.process.returncode == CONFIG_ERROR_EXIT_CODE
    finally:
        for child in (worker, other):
            child.stop(5)


def test_a_worker_that_crashes_is_restarted(tmp_path):
    other = _child(tmp_path, "control-plane", "import time; time.sleep(60)")
    marker = tmp_path / "starts"
    # Each start appends a line; the second start stays up (as a restarted worker that serves would).
    code = (
        f"import pathlib, sys, time; p = pathlib.Path({str(marker)!r}); "
        "n = len(p.read_text().splitlines()) if p.exists() else 0; p.write_text('x\\n' * (n + 1)); "
        "sys.exit(1) if n == 0 else time.sleep(60)"
    )
    worker = _child(tmp_path, "worker", code)
    children = [other, worker]
    stop = threading.Event()
    supervisor = threading.Thread(target=_supervise, args=(children, worker, stop))
    supervisor.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (
            marker.exists() and len(marker.read_text().splitlines()) == 2
        ):
            time.sleep(0.1)
        assert len(marker.read_text().splitlines()) == 2
    finally:
        stop.set()
        supervisor.join(10)
        for child in children:
            child.stop(5)
