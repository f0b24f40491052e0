"""A second server on a port a control plane already serves is refused at its bind. gRPC sets SO_REUSEPORT
by default, so a second control plane (or a leftover one) bound the port without an error and the kernel
spread new connections over the two: uploads landed in the other one's state dir, and its READY adapters
had no artifact where the first looked."""

from __future__ import annotations

import pytest

from control_plane.server.server import serve
from openlora.listen import ListenError

from .conftest import make_config


def test_a_second_control_plane_on_a_served_port_is_refused(
    cp, database_url, redis_url, tmp_path, server_thread
):
    config = make_config(database_url, tmp_path / "second", redis_url, listen=cp.target)
    with pytest.raises(ListenError) as refused:
        server_thread.run(serve(config))
    assert cp.target in str(refused.value)
    assert "--listen" in str(refused.value)
    assert cp.admin().list_workers() is not None  # the first one still serves
