"""How `openlora up` starts a dead child again: the delays it waits, and what it never restarts."""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time
from pathlib import Path

from openlora.commands.supervise import (
    CONFIG_ERROR_EXIT_CODE,
    RESTART_BACKOFF_MAX_S,
    RESTART_BACKOFF_MIN_S,
    RESTART_BACKOFF_RESET_S,
    Backoff,
    Child,
    supervise,
)


def test_restart_delay_doubles_up_to_the_cap_while_workers_die_young():
    backoff = Backoff()
    delays = [backoff.next_delay_s(ran_s=1.0) for _ in range(10)]
    assert delays[:4] == [RESTART_BACKOFF_MIN_S * 2**i for i in range(4)]
    assert all(b == min(a * 2, RESTART_BACKOFF_MAX_S) for a, b in itertools.pairwise(delays))
    assert delays[-1] == RESTART_BACKOFF_MAX_S


def test_restart_delay_falls_back_to_the_minimum_after_a_long_healthy_run():
    backoff = Backoff()
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
        assert supervise([other, worker], threading.Event()) == 1
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
    supervisor = threading.Thread(target=supervise, args=(children, stop))
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


def _crash_once_code(marker: Path) -> str:
    """Each start appends a line to `marker`; the first start exits 1, later ones stay up."""
    return (
        f"import pathlib, sys, time; p = pathlib.Path({str(marker)!r}); "
        "n = len(p.read_text().splitlines()) if p.exists() else 0; p.write_text('x\\n' * (n + 1)); "
        "sys.exit(1) if n == 0 else time.sleep(60)"
    )


def _wait_for_starts(marker: Path, num_starts: int, timeout_s: float = 20) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if marker.exists() and len(marker.read_text().splitlines()) >= num_starts:
            break
        time.sleep(0.1)
    return len(marker.read_text().splitlines()) if marker.exists() else 0


def test_a_control_plane_that_crashes_is_restarted_while_the_worker_keeps_running(tmp_path):
    marker = tmp_path / "starts"
    worker = _child(tmp_path, "worker", "import time; time.sleep(60)")
    control_plane = _child(tmp_path, "control plane", _crash_once_code(marker))
    children = [worker, control_plane]
    stop = threading.Event()
    supervisor = threading.Thread(target=supervise, args=(children, stop))
    supervisor.start()
    try:
        assert _wait_for_starts(marker, 2) == 2
        assert children[0] is worker and worker.alive()
        assert children[1] is not control_plane and children[1].alive()
    finally:
        stop.set()
        supervisor.join(10)
        for child in children:
            child.stop(5)
    assert not supervisor.is_alive()


def test_a_restart_that_fails_is_tried_again_until_one_succeeds(tmp_path):
    marker = tmp_path / "starts"
    real = _child(tmp_path, "redis", _crash_once_code(marker))
    attempts = []

    class FailsToStartTwice(Child):
        def __init__(self) -> None:  # stands for the child that died; its restarts fail twice
            self.name, self.process, self.log_path, self.started_at = (
                "redis",
                real.process,
                real.log_path,
                0.0,
            )

        def restarted(self) -> Child:
            attempts.append(time.monotonic())
            if len(attempts) < 3:
                raise OSError("address already in use")
            return real.restarted()

    _wait_for_starts(marker, 1)
    real.process.wait(10)
    children = [FailsToStartTwice()]
    stop = threading.Event()
    supervisor = threading.Thread(target=supervise, args=(children, stop))
    supervisor.start()
    try:
        assert _wait_for_starts(marker, 2) == 2
        assert len(attempts) == 3 and children[0].alive()
        assert attempts[2] - attempts[1] >= attempts[1] - attempts[0] >= RESTART_BACKOFF_MIN_S
    finally:
        stop.set()
        supervisor.join(10)
        for child in children:
            child.stop(5)
