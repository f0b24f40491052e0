"""One tenant's flood cannot take the queue every tenant shares: past its share of streams on a worker the
tenant alone gets RESOURCE_EXHAUSTED, while another tenant is still served, and its next call is served
again once one of its streams ended."""

from __future__ import annotations

import pytest

from openlora import errors
from openlora.client import Client

PROMPT = "the quick brown fox"


def test_a_tenant_past_its_stream_share_is_refused_alone(system, make_worker):
    worker = make_worker(max_streams_per_tenant=2)
    target = f"127.0.0.1:{worker.port}"
    _, _, flooder = system.new_tenant()
    _, _, other = system.new_tenant()
    with Client(target, flooder) as a, Client(target, other) as b:
        open_streams = [a.generate_stream(prompt=PROMPT, max_tokens=400) for _ in range(2)]
        for stream in open_streams:
            next(stream)  # both run now
        with pytest.raises(errors.ResourceExhausted, match="streams on this worker"):
            a.complete(PROMPT, max_tokens=2)
        assert b.complete(PROMPT, max_tokens=2)  # another tenant is not held back
        open_streams.pop().close()  # one of the flooder's streams ends (cancelled)
        for _ in range(100):  # the worker sees the cancellation shortly
            try:
                assert a.complete(PROMPT, max_tokens=2)
                break
            except errors.ResourceExhausted:
                continue
        else:
            pytest.fail("the tenant stayed refused after one of its streams ended")
        open_streams.pop().close()


def test_the_default_share_is_half_of_what_the_worker_holds(tmp_path):
    from data_plane.server.config import EngineSettings, WorkerConfig

    common = dict(model_dir=tmp_path, control_plane_target="x:1", worker_token="t", state_dir=tmp_path)
    config = WorkerConfig(**common, engine=EngineSettings(max_num_seqs=64), max_waiting=256)
    assert config.resolved_max_streams_per_tenant == 160
    with pytest.raises(ValueError, match="max_streams_per_tenant"):
        WorkerConfig(**common, max_streams_per_tenant=0)
