"""benchmarks/slot_install_bench.py on a tiny model: both ways of copying leave the slot the same (the
benchmark checks it before timing), and a replayed copy makes fewer torch calls than one recorded anew."""

from __future__ import annotations

import pytest

from benchmarks import slot_install_bench
from tests.bench.tiny_bench_model import TINY, one_torch_thread, tiny_bench_model  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_replayed_copy_makes_fewer_torch_calls_and_every_figure_is_reported(tmp_path_factory):
    root = tiny_bench_model(tmp_path_factory).root
    results = slot_install_bench.run("cpu", num_adapters=2, repeats=3, shape=TINY, root=root, settle_s=0.2)
    calls = results["torch_calls_per_copy"]
    assert calls["replayed"] < calls["recorded_per_copy"]
    for way in ("replayed", "recorded_per_copy"):
        for label in ("idle", "beside_steps"):
            figure = results[f"{way}_{label}"]
            assert figure["n"] == 6 and 0 < figure["p50"] <= figure["p90"]
    assert results["engine_steps_per_s_while_copying"] > 0
