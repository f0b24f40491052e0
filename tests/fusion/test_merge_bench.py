"""benchmarks/merge_bench.py runs its code paths at a tiny size: a row per method with the merge's rank,
build time, truncation error and peak memory; the Llama-3-8B-shaped sources are valid PEFT adapters."""

from __future__ import annotations

import json

import pytest

from benchmarks.merge_bench import LLAMA_SHAPES, main, write_llama_layer_adapters
from openlora.adapter_format import validate_adapter_dir
from tests.fusion.merge_support import SOURCES, shared_model


@pytest.fixture(scope="session")
def merge_model(tmp_path_factory):
    return shared_model(tmp_path_factory)


def test_bench_reports_every_method_on_the_models_adapters(merge_model, tmp_path):
    model = tmp_path / "model"
    (model / "adapters").mkdir(parents=True)
    for name in SOURCES[:2]:  # r4 on q, v and r8 on all seven
        (model / "adapters" / name).symlink_to(merge_model.adapter_dirs[name])
    out = tmp_path / "merge_bench.json"
    code = main(["--model", str(model), "--methods", "ties,dare_linear", "--skip-llama", "--out", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["rank"], r["num_modules"]) for r in rows] == [
        ("ties", 12, 14),
        ("dare_linear", 12, 14),
    ]
    for row in rows:
        assert row["build_ms"] > 0 and row["peak_extra_mib"] >= 0
        # Pruning at density 0.5 makes each delta full rank: rank 4 + 8 keeps part of it.
        assert 0 < row["relative_error"] < 1


def test_llama_layer_sources_are_peft_adapters_of_the_8b_shapes(tmp_path):
    (path,) = write_llama_layer_adapters(tmp_path, 1, 16)
    info = validate_adapter_dir(path, None, max_rank=16)
    assert info.rank == 16 and set(info.target_modules) == set(LLAMA_SHAPES) and info.layers == (0,)
