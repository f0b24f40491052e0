"""quant_bench's bookkeeping: targets judged as ratios to fp32, and every kernel candidate runs."""

from __future__ import annotations

import torch

from benchmarks.quant_bench import kernel_table, native_crossover, target_rows


def test_targets_are_ratios_to_fp32_with_their_direction():
    figures = {
        "fp32": {"decoder_linear_bytes": 100.0, "batch1_step_ms": 10.0, "batch32_tokens_per_s": 50.0},
        "int8": {"decoder_linear_bytes": 26.0, "batch1_step_ms": 6.0, "batch32_tokens_per_s": 60.0},
        "int4": {"decoder_linear_bytes": 14.0, "batch1_step_ms": 9.0, "batch32_tokens_per_s": 40.0},
    }
    met = {(t["figure"], t["engine"]): t["met"] for t in target_rows(figures)}
    assert met == {
        ("decoder_linear_bytes", "int4"): True,
        ("decoder_linear_bytes", "int8"): True,
        ("batch1_step_ms", "int8"): False,  # 0.6 > 0.5
        ("batch1_step_ms", "int4"): True,
        ("batch32_tokens_per_s", "int8"): True,
    }


def test_every_cpu_kernel_candidate_runs_and_is_timed():
    rows = kernel_table(64, repeats=1, device=torch.device("cpu"))
    assert {r["rows"] for r in rows} == {1, 32}
    assert len(rows) == 22 and all(r["ms"] > 0 for r in rows)
    # The int4 layer's own kernel is the native one here, and the table marks it chosen at both sizes.
    chosen = [
        r["kernel"] for r in rows if r["kernel"].startswith("int4") and r["kernel"].endswith("[chosen]")
    ]
    assert chosen == [
        "int4 native fp32 (int4_cpu.c, fused) [chosen]",
        "int4 native fp32 (int4_cpu.c, dequantized blocks + fp32 GEMM) [chosen]",
    ]
    # int8: one float32 row takes the native kernel, 32 rows one of the integer paths, never both.
    for num_rows, native in ((1, True), (32, False)):
        int8_chosen = [
            r["kernel"]
            for r in rows
            if r["rows"] == num_rows and r["kernel"].startswith("int8") and "[chosen" in r["kernel"]
        ]
        assert len(int8_chosen) == 1 and ("native" in int8_chosen[0]) is native, int8_chosen


def test_the_native_crossover_times_both_paths_at_every_size():
    rows = native_crossover(64, repeats=1)
    assert [r["rows"] for r in rows] == [1, 2, 4, 8, 16, 24, 32, 64, 128]
    keys = ("fused_ms", "blocks_gemm_ms", "int8_native_ms", "int8_integer_ms", "dense_fp32_ms")
    assert all(r[key] > 0 for r in rows for key in keys)
