"""The suite's own process starters: a port picked free and taken by another process before the child binds
it (it happened in CI: a worker restarted by a fault test found its new port in use) starts the child again on
another port, instead of failing the test that wanted a worker."""

from __future__ import annotations

import socket
import sys

from openlora.embedded import free_port


def test_a_worker_whose_picked_port_was_taken_starts_on_another(fault_system, monkeypatch):
    conftest = sys.modules[type(fault_system).__module__]
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    taken_port = taken.getsockname()[1]
    picks = [taken_port]
    monkeypatch.setattr(conftest, "free_port", lambda: picks.pop() if picks else free_port())
    try:
        worker = fault_system.spawn_worker()
    finally:
        taken.close()
    assert not picks and worker.process.poll() is None and worker.target != f"127.0.0.1:{taken_port}"
    log = worker.log_path.read_text(errors="replace")
    assert conftest.PORT_TAKEN in log  # the first child said so, and the second one serves
