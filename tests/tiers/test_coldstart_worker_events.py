"""The cold-start benchmark reads why a call was cold from the worker's debug log: the lines a real engine
and hint handler write, formatted as `openlora` formats its log, parse into the events `why_cold` uses."""

from __future__ import annotations

import asyncio
import logging
import shutil

from benchmarks.coldstart import worker_events
from data_plane.adapters.hint_actions import apply_hint
from data_plane.server.artifact_store import ArtifactStore
from openlora.hints import Hint
from tests.engine.conftest import greedy, make_engine, run_to_completion

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # openlora.cli's
ONE_ADAPTER_BUDGET = 80_000  # host buffers in fp32: r8_all 65,536 B, r16_rslora 77,824 B; never both


def _drain_loads(engine) -> None:
    engine.step()
    for _ in range(500):
        if not engine.loader.num_in_flight:
            return
        engine.step()
    raise AssertionError("a load never landed")


def test_worker_log_lines_parse_into_hint_prefetch_and_eviction_events(tiny_model, tmp_path, caplog):
    store = ArtifactStore(tmp_path / "artifacts", fetch=None, spec=None, max_rank=64, max_size_bytes=1 << 30)
    hinted, other = tiny_model.ref("r16_rslora"), tiny_model.ref("r8_all")
    shutil.copytree(hinted.path, store.path_of(hinted.key))
    engine = make_engine(tiny_model, host_cache_bytes=ONE_ADAPTER_BUDGET, num_adapter_slots=1)
    caplog.set_level(logging.DEBUG)
    try:
        asyncio.run(apply_hint(engine, Hint("prewarm", "id", hinted.key, tier="host"), store))
        _drain_loads(engine)  # prewarm hint, prefetch started, loaded into host memory
        engine.add_request(greedy("other", [3, 4], [other], max_tokens=2))
        run_to_completion(engine)  # its host copy takes the room of the unused prefetch
        engine.prefetch(other.key, (other,))
        engine.step()  # in a slot and in host memory: held
        engine.adapter_cache.drop_host(other.key)
        engine.add_request(greedy("hinted", [5, 6], [hinted], max_tokens=2))
        run_to_completion(engine)  # takes the only slot: the other adapter leaves it with no host copy
    finally:
        engine.shutdown()
    formatter = logging.Formatter(LOG_FORMAT)
    text = "\n".join(formatter.format(record) for record in caplog.records)
    events = [(e["event"], e["key"]) for e in worker_events(text)]
    h, o = hinted.key[:12], other.key[:12]
    assert events == [
        ("hint", h),
        ("prefetch_started", h),
        ("prefetch_loaded", h),
        ("host_evicted", h),
        ("skipped_held", o),
        ("left_slot", o),
    ]
    stamps = [e["at_s"] for e in worker_events(text)]
    assert stamps == sorted(stamps) and stamps[-1] - stamps[0] < 600
