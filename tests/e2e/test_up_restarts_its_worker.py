"""`openlora up` supervises its worker: a worker killed with SIGKILL is started again, the new one serves,
the rest of the system stays up, and SIGTERM still stops everything cleanly."""

from __future__ import annotations

import time

import psutil
import pytest

from openlora import errors
from openlora.client import Client
from tests.e2e.test_up import PROMPT
from tests.e2e.up_process import running_up, worker_children

pytestmark = pytest.mark.slow


def test_up_restarts_a_killed_worker_and_the_new_one_serves(database_url, redis_url, e2e_model_dir, tmp_path):
    flags = ("--database-url", database_url, "--redis-url", redis_url)
    with running_up(tmp_path, e2e_model_dir, *flags) as (process, fields):
        up = psutil.Process(process.pid)
        control_plane = [p for p in up.children() if "control-plane" in p.cmdline()]
        (killed,) = worker_children(up)
        killed.kill()
        killed.wait(30)

        deadline = time.monotonic() + 120
        text = None
        while text is None and time.monotonic() < deadline and process.poll() is None:
            try:
                with Client(fields["inference"], fields["key"]) as client:
                    text = client.complete(PROMPT, adapter="ad0", max_tokens=4)
            except errors.OpenLoRAError:  # the new worker is not serving yet
                time.sleep(0.3)
        assert text, "no worker served a Generate after the kill"
        (restarted,) = worker_children(up)
        assert restarted.pid != killed.pid
        assert process.poll() is None and all(p.is_running() for p in control_plane)
    # running_up sent SIGTERM and saw `up` exit 0: everything it started is stopped.
    assert not restarted.is_running() or restarted.status() == psutil.STATUS_ZOMBIE
