"""benchmarks/engine_bench.py end to end on a tiny model: the best and skewed adapter cases against the base
model, and the roofline run, measure what they say they measure."""

from __future__ import annotations

import json

import pytest

from benchmarks import engine_bench, roofline
from benchmarks.engine_bench import run_adapters, run_roofline, skewed_adapter_dirs
from benchmarks.steady_driver import PROMPT_TOKENS
from tests.bench.tiny_bench_model import RANKS, TINY, one_torch_thread, tiny_bench_model  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rank(adapter_dir) -> int:
    return json.loads((adapter_dir / "adapter_config.json").read_text())["r"]


def test_skewed_adapters_mix_ranks_down_the_popularity_order(tmp_path_factory):
    model = tiny_bench_model(tmp_path_factory)
    skewed = skewed_adapter_dirs(8, RANKS, TINY, model.root)
    assert [rank for _, rank in skewed] == [2, 4, 8, 2, 4, 8, 2, 4]
    assert [_rank(d) for d, _ in skewed] == [2, 4, 8, 2, 4, 8, 2, 4]
    assert len({d for d, _ in skewed}) == 8


def test_best_and_skewed_cases_run_interleaved_with_the_base_and_the_skewed_one_reloads_from_host(
    tmp_path_factory,
):
    model = tiny_bench_model(tmp_path_factory)
    best_dirs = model.adapters_by_rank[4][:6]
    skewed = skewed_adapter_dirs(18, RANKS, TINY, model.root)
    figures = run_adapters(
        model.model_dir,
        best_dirs,
        skewed,
        steps=24,
        warmup_steps=2,
        decode_tokens=8,
        num_requests=6,
        num_slots=6,
        read_bytes=2**20,
    )
    assert figures["unsteady_steps_skipped"]["skewed"] > 0  # replacements prefill, some wait for a load
    assert [len(figures["step_ms"][tag]) for tag in ("base", "best", "skewed")] == [24, 24, 24]
    best, skewed_case = figures["cases"]["best"], figures["cases"]["skewed"]
    # best: request i always on adapter i, every adapter in every step, nothing loaded while timed
    assert best["distinct_adapters_per_step"] == {"mean": 6.0, "min": 6, "max": 6}
    assert best["adapter_loads_while_timed"] == {}
    # skewed: popular adapters repeat within a step; tail adapters come back from host memory, never disk
    assert skewed_case["adapters"]["on_host_before_the_run"] == 18
    assert skewed_case["adapters"]["ranks"] == {"2": 6, "4": 6, "8": 6}
    assert skewed_case["distinct_adapters_per_step"]["max"] <= 6
    assert skewed_case["distinct_adapters_per_step"]["mean"] < 6
    loads = skewed_case["adapter_loads_while_timed"]
    assert loads.get("request/host", 0) > 0 and "request/disk" not in loads
    assert skewed_case["adapters"]["distinct_adapters_requested_while_timed"] > 6
    for case in (best, skewed_case):
        assert case["ratio_median"] == pytest.approx(
            figures["base"]["median_step_ms"] / case["stats"]["median_step_ms"]
        )
        assert case["ratio_all_steps"] > 0
    # the best case's bound by memory: 6 distinct rank-4 adapters' factors at the measured rate, in the
    # float16 slots the fixtures' float16 files are kept in on the native kernels
    bound = best["streaming_bound"]
    per_adapter = roofline.lora_params_per_adapter(
        roofline.model_linear_shapes(engine_bench.spec_of(TINY)), 4
    )
    assert bound["slot_dtype"] == "float16"
    assert bound["factor_bytes_per_step"] == 6 * per_adapter * 2
    assert bound["read_buffer_bytes"] == 2**20
    readings = bound["read_bytes_per_s_readings"]  # before and after the run: the faster one counts
    assert len(readings) == 2 and min(readings) > 0 and bound["read_bytes_per_s"] == max(readings)
    base_s = figures["base"]["median_step_ms"] / 1e3
    assert bound["ratio"] == pytest.approx(
        base_s / (base_s + bound["factor_bytes_per_step"] / bound["read_bytes_per_s"])
    )
    table = engine_bench.adapters_table(figures)
    assert "power law over 18 adapters (r2/4/8), 6 slots" in table and "request/host" in table
    assert f"at most **{bound['ratio']:.3f}**" in table and "float16 slots" in table


def test_roofline_run_counts_steady_steps_of_all_sequences_decoding(tmp_path_factory):
    model = tiny_bench_model(tmp_path_factory)
    figures = run_roofline(
        model.model_dir,
        steps=3,
        warmup_steps=1,
        decode_tokens=8,
        gemm_seconds=0.01,
        square_size=64,
        num_requests=8,
    )
    assert figures["engine"]["steps"] == 3 and figures["requests"] == 8
    assert PROMPT_TOKENS < figures["mean_context_tokens"] <= PROMPT_TOKENS + 8
    gemm = figures["gemm"]
    assert (
        gemm["roofline_flops_per_s"] == max(gemm["model_shaped_flops_per_s"], gemm["square_flops_per_s"]) > 0
    )
    assert [s["name"] for s in gemm["shapes"]][-1] == "lm_head" and gemm["rows"] == 8
    tokens_per_s = figures["engine"]["tokens_per_s_median"]
    assert figures["fraction_of_roofline"] == pytest.approx(
        tokens_per_s * figures["linear_flops_per_token"] / gemm["roofline_flops_per_s"]
    )
    assert "share of roofline (linears)" in engine_bench.roofline_table(figures)
