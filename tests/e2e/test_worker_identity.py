"""A worker process's hold on its worker id: one cut off from the control plane whose id another process
took stops serving under it and exits; one stopped cleanly stops counting as live at once."""

from __future__ import annotations

import shutil
import signal
import time
import uuid

import psycopg
import pytest

from openlora.v1 import admin_pb2

pytestmark = pytest.mark.slow

# data_plane.server.main.IDENTITY_LOST_EXIT_CODE (not imported: it would load the engine's modules here)
IDENTITY_LOST_EXIT_CODE = 4


def _listed(admin, worker_id: str) -> admin_pb2.Worker:
    workers = admin.stub.ListWorkers(admin_pb2.ListWorkersRequest(), metadata=admin.metadata).workers
    return {w.id: w for w in workers}[worker_id]


def _age_until_dead(cp, admin, worker_id: str) -> None:
    """The worker's last heartbeat a day ago, as if it had been away that long (a beat it sent before it
    was stopped may land after the first update: updated again until it stays so)."""
    while True:
        with psycopg.connect(cp.app.config.database_url) as conn:
            conn.execute(
                "UPDATE worker SET last_heartbeat_at = now() - interval '1 day' WHERE id = %s", (worker_id,)
            )
        time.sleep(0.5)
        if not _listed(admin, worker_id).live:
            return


def test_a_worker_whose_id_another_process_took_while_it_was_away_drains_and_exits(
    control_plane, spawn_worker, tmp_path
):
    """Cut off from the control plane (here: stopped) past three heartbeat intervals, a worker whose state
    dir was copied and started elsewhere meanwhile came back heartbeating under the id the copy now held,
    and the control plane took its beats: two processes counted as one live worker, sharing its request
    id reservations and usage. Its heartbeat is refused; it stops serving, drains and exits with
    IDENTITY_LOST_EXIT_CODE for its supervisor (whose restart is refused while the copy is live)."""
    cp, admin = control_plane
    model_name = f"held-{uuid.uuid4().hex[:8]}"
    first = spawn_worker(tmp_path / "first", extra_args=("--model-name", model_name))
    worker_id = (tmp_path / "first" / "worker_id").read_text().strip()
    first.process.send_signal(signal.SIGSTOP)
    try:
        _age_until_dead(cp, admin, worker_id)
        shutil.copytree(tmp_path / "first", tmp_path / "copy", ignore=shutil.ignore_patterns("worker.pid"))
        copy = spawn_worker(tmp_path / "copy", extra_args=("--model-name", model_name))
        assert _listed(admin, worker_id).address == copy.target
    finally:
        first.process.send_signal(signal.SIGCONT)
    assert first.process.wait(120) == IDENTITY_LOST_EXIT_CODE, first.log_tail()
    log = first.log_tail()
    assert f"another process registered worker id {worker_id}" in log and "instance_id" in log
    listed = _listed(admin, worker_id)
    assert listed.live and listed.address == copy.target
    assert copy.process.poll() is None


def test_a_cleanly_stopped_worker_stops_counting_as_live_at_once(control_plane, spawn_worker, tmp_path):
    """Stopped by SIGTERM and drained, a worker counted as live for three more heartbeat intervals: its
    rank limit still bounded uploads and mixes (`max_lora_rank`), its base model's dimensions held the
    name. It now tells the control plane it leaves. A crashed one (SIGKILL) says nothing: the heartbeat
    rule alone ends it."""
    from control_plane.app import LIVE_HEARTBEATS
    from control_plane.workers.service import max_lora_rank

    cp, admin = control_plane
    live_within_s = LIVE_HEARTBEATS * cp.app.config.heartbeat_interval_ms / 1000
    model_name = f"leaving-{uuid.uuid4().hex[:8]}"
    stopped = spawn_worker(
        tmp_path / "stopped", extra_args=("--model-name", model_name, "--max-lora-rank", "128")
    )
    killed = spawn_worker(tmp_path / "killed", extra_args=("--model-name", model_name))
    stopped_id = (tmp_path / "stopped" / "worker_id").read_text().strip()
    killed_id = (tmp_path / "killed" / "worker_id").read_text().strip()
    with cp.app.sessions.begin() as s:
        assert max_lora_rank(s, model_name, live_within_s) == 128
    assert _listed(admin, stopped_id).live
    stopped.process.send_signal(signal.SIGTERM)
    assert stopped.process.wait(60) == 0, stopped.log_tail()
    listed = _listed(admin, stopped_id)
    assert not listed.live and listed.HasField("left_at")
    with cp.app.sessions.begin() as s:
        assert max_lora_rank(s, model_name, live_within_s) == 16  # the other worker's, --max-lora-rank 16
    killed.kill()
    assert not _listed(admin, killed_id).HasField("left_at")
