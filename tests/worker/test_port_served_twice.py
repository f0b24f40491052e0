"""A second worker on the port a worker already serves is refused at its bind (gRPC's default
SO_REUSEPORT let it bind and take a share of the first one's connections, under its own worker id)."""

from __future__ import annotations

import pytest

from openlora.listen import ListenError

from .conftest import start_worker


def test_a_second_worker_on_a_served_port_is_refused(system, tmp_path):
    with pytest.raises(ListenError) as refused:
        start_worker(
            system.loop,
            system.control_plane.target,
            system.model_dir,
            tmp_path / "second",
            None,
            listen=system.target,
        )
    assert system.target in str(refused.value)
    assert "--listen" in str(refused.value)
