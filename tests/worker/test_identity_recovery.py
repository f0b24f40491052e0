"""A worker whose heartbeat the control plane refuses (its row names another run of the worker) registers
again, and stops serving only when that registration is refused too: another process is live under its id.
A database restored to an older snapshot names this state dir's previous run, and must not stop a worker
that serves alone."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

from sqlalchemy import update

from control_plane.db.base import utc_now
from control_plane.workers.models import Worker


def _instance_of(system, worker_id: str) -> str:
    with system.control_plane.app.sessions.begin() as s:
        return s.get(Worker, worker_id).instance_id


def _hand_row_to(system, worker_id: str, instance_id: str, heartbeat_age: timedelta) -> None:
    with system.control_plane.app.sessions.begin() as s:
        s.execute(
            update(Worker)
            .where(Worker.id == worker_id)
            .values(instance_id=instance_id, last_heartbeat_at=utc_now() - heartbeat_age)
        )


def _wait_until_decided(system, worker, other: str, other_beats: bool = False) -> None:
    """Until the worker took its row back or lost its id (its next heartbeat decides). `other_beats`: the
    other instance heartbeats meanwhile, as a live process does (so it stays live whatever the test's pace;
    a heartbeat stamped ahead of the control plane's clock does not count)."""
    deadline = time.monotonic() + 60
    while _instance_of(system, worker.worker_id) == other and not worker.lost_identity:
        assert time.monotonic() < deadline, "the worker's heartbeat never came"
        if other_beats:
            with system.control_plane.app.sessions.begin() as s:
                s.execute(
                    update(Worker)
                    .where(Worker.id == worker.worker_id, Worker.instance_id == other)
                    .values(last_heartbeat_at=utc_now())
                )
        time.sleep(0.2)


def test_a_worker_whose_row_a_restored_snapshot_gives_an_older_run_registers_again(system, make_worker):
    """The snapshot was taken before the worker's last restart: its row names the previous run's instance,
    whose last heartbeat (the snapshot's) is a day old. No other process holds the id, yet the heartbeat's
    refusal (FAILED_PRECONDITION naming instance_id) made the worker drain and exit with status 4."""
    worker = make_worker()
    older_run = uuid.uuid4().hex
    _hand_row_to(system, worker.worker_id, older_run, heartbeat_age=timedelta(days=1))
    _wait_until_decided(system, worker, older_run)
    assert not worker.lost_identity and not worker.state.draining
    assert _instance_of(system, worker.worker_id) == worker.instance_id


def test_a_worker_whose_id_a_live_process_holds_stops_serving(system, make_worker):
    """Another instance registered the id and is live (it heartbeats): registering again is refused, and
    the worker stops serving under the id, naming both refusals."""
    worker = make_worker()
    other = uuid.uuid4().hex
    _hand_row_to(system, worker.worker_id, other, heartbeat_age=timedelta(0))
    _wait_until_decided(system, worker, other, other_beats=True)
    assert worker.state.draining
    assert "instance_id" in worker.lost_identity and "registering again: worker_id" in worker.lost_identity
    assert _instance_of(system, worker.worker_id) == other
