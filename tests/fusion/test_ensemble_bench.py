"""benchmarks/ensemble_bench.py runs end to end at a tiny size and reports what it measured."""

from __future__ import annotations

import pytest

from benchmarks.ensemble_bench import run, target_ratio
from tests.fusion.merge_support import shared_model


def test_target_is_k_single_rows_for_the_ensemble_fraction():
    assert target_ratio(3, 0.25) == pytest.approx(2 / 3)
    assert target_ratio(1, 0.25) == 1.0


def test_bench_times_steady_steps_of_both_batches_with_k_sequences_per_ensemble(tmp_path_factory):
    model = shared_model(tmp_path_factory)
    adapter_dirs = list(model.adapter_dirs.values())
    figures = run(
        model.model_dir,
        adapter_dirs,
        steps=3,
        warmup_steps=1,
        decode_tokens=6,
        k=3,
        num_requests=8,
        max_lora_rank=64,
    )
    # 8 requests, 2 of them ensembles of 3: 6 + 2 x 3 sequences running, and the control as many.
    assert figures["sequences_running"] == {"single": 8, "ensemble": 12, "rows": 12}
    assert figures["ensemble_fraction"] == 0.25 and figures["target_ratio"] == pytest.approx(2 / 3)
    assert [len(figures["step_ms"][tag]) for tag in ("single", "ensemble", "rows")] == [3, 3, 3]
    assert figures["ratio_median"] > 0 and figures["rows_over_ensemble_step_median"] > 0
