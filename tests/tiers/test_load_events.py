"""The engine counts finished adapter loads by cause (request / prefetch) and the tier they came from."""

from __future__ import annotations

import threading

import torch

from data_plane.engine.adapter_loader import _one_intra_op_thread
from tests.engine.conftest import greedy, make_engine


def _drain(engine) -> list:
    outputs = []
    while engine.has_unfinished():
        outputs.extend(engine.step())
    return outputs


def test_loads_are_counted_by_cause_and_source_tier(tiny_model):
    engine = make_engine(tiny_model, host_cache_bytes=64 << 20)
    try:
        ref = tiny_model.ref("r8_all")
        engine.prefetch(ref.key, (ref,))  # a hint: disk -> host, no request yet
        _drain(engine)
        assert engine.load_counts == {("prefetch", "disk"): 1}
        engine.add_request(greedy("r", [4, 5], adapters=[ref], max_tokens=2))
        finals = [out for out in _drain(engine) if out.finished]
        assert finals[0].cache_tier == "host"
        assert engine.load_counts == {("prefetch", "disk"): 1, ("request", "host"): 1}
        assert engine.load_ms_sums[("request", "host")] > 0
        other = tiny_model.ref("r4_qv")
        engine.add_request(greedy("s", [4, 5], adapters=[other], max_tokens=2))
        _drain(engine)
        assert engine.load_counts[("request", "disk")] == 1
    finally:
        engine.shutdown()


def test_loader_thread_uses_one_intra_op_thread_and_leaves_the_callers_alone():
    before = torch.get_num_threads()
    seen = []

    def loader_thread():
        _one_intra_op_thread()
        seen.append(torch.get_num_threads())

    thread = threading.Thread(target=loader_thread)
    thread.start()
    thread.join()
    assert seen == [1]
    assert torch.get_num_threads() == before
