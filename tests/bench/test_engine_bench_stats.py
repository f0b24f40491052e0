"""The engine benchmark's statistics and roofline arithmetic on synthetic numbers (no engine, no timing)."""

import itertools
from collections import Counter

import pytest

from benchmarks import roofline
from benchmarks.engine_bench import compare, percentile, roofline_figures, step_stats
from benchmarks.steady_driver import popularity_draws
from openlora.base_model import BaseModelSpec


def test_percentile_interpolates_between_closest_ranks():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]  # unsorted on purpose
    assert percentile(values, 0.5) == 3.0
    assert percentile(values, 0.0) == 1.0
    assert percentile(values, 1.0) == 5.0
    assert percentile(values, 0.1) == pytest.approx(1.4)
    assert percentile([2.0, 4.0], 0.5) == 3.0


def test_percentile_rejects_no_values_and_out_of_range_fraction():
    with pytest.raises(ValueError):
        percentile([], 0.5)
    with pytest.raises(ValueError):
        percentile([1.0], 1.5)


def test_step_stats_give_median_p10_and_throughput_from_the_median():
    times_s = [0.010 * k for k in range(1, 12)]  # 10 ms .. 110 ms
    stats = step_stats(times_s, tokens_per_step=32)
    assert stats["steps"] == 11
    assert stats["median_step_ms"] == pytest.approx(60.0)
    assert stats["p10_step_ms"] == pytest.approx(20.0)
    assert stats["tokens_per_s_median"] == pytest.approx(32 / 0.060)
    assert stats["tokens_per_s_p10"] == pytest.approx(32 / 0.020)
    assert stats["tokens_per_s_whole_run"] == pytest.approx(32 * 11 / sum(times_s))


def test_ratio_of_medians_ignores_a_few_huge_outlier_steps():
    base = [0.030] * 95 + [1.5] * 5  # five steps stalled by other work on the machine
    multi = [0.040] * 97 + [2.5] * 3
    stats = compare(base, multi, tokens_per_step=32)
    assert stats["ratio_median"] == pytest.approx(0.75)
    assert stats["ratio_p10"] == pytest.approx(0.75)
    assert stats["ratio_median_of_pairs"] == pytest.approx(0.75)
    assert stats["base"]["tokens_per_s_median"] == pytest.approx(32 / 0.030)
    assert stats["multi"]["tokens_per_s_median"] == pytest.approx(32 / 0.040)
    # the whole-run figure is what the outliers distort
    assert stats["ratio_whole_run"] != pytest.approx(0.75, abs=0.05)


def test_ratio_is_multi_throughput_over_base_throughput():
    stats = compare([0.020, 0.020, 0.020], [0.010, 0.010, 0.010], tokens_per_step=32)
    assert stats["ratio_median"] == pytest.approx(2.0)
    assert stats["multi"]["tokens_per_s_median"] / stats["base"]["tokens_per_s_median"] == pytest.approx(2.0)


# -- roofline arithmetic ---------------------------------------------------------------------------------

LLAMA_50M_SPEC = BaseModelSpec("bench", "LlamaForCausalLM", 512, 1376, 6, 8, 8, 64, 32000)


def test_a_token_costs_two_flops_per_weight_of_every_linear_including_lm_head_not_the_embedding():
    shapes = roofline.model_linear_shapes(LLAMA_50M_SPEC)
    per_layer = 4 * 512 * 512 + 3 * 512 * 1376  # q, k, v, o and gate, up, down
    expected_params = 6 * per_layer + 512 * 32000  # lm_head once; the embedding is a lookup
    assert roofline.linear_params_per_token(shapes) == expected_params == 35_356_672
    assert roofline.linear_flops_per_token(shapes) == 2 * expected_params


def test_grouped_query_attention_shrinks_k_and_v_only():
    spec = BaseModelSpec("gqa", "LlamaForCausalLM", 2048, 5632, 22, 32, 4, 64, 32000)
    by_name = {s.name: s for s in roofline.model_linear_shapes(spec)}
    assert (by_name["q_proj"].out_features, by_name["k_proj"].out_features) == (2048, 256)
    assert (by_name["v_proj"].out_features, by_name["o_proj"].in_features) == (256, 2048)
    assert by_name["down_proj"].count == 22 and by_name["lm_head"].count == 1


def test_attention_flops_grow_with_the_context():
    # q.k and the weighted sum of v: 2 x 2 x heads x head_dim FLOPs per context token, per layer
    assert roofline.attention_flops_per_token(LLAMA_50M_SPEC, 100) == 4 * 6 * 8 * 64 * 100
    assert roofline.attention_flops_per_token(LLAMA_50M_SPEC, 200) == 2 * roofline.attention_flops_per_token(
        LLAMA_50M_SPEC, 100
    )


def test_roofline_fraction_and_throughput():
    assert roofline.roofline_fraction(1000.0, 70e6, 200e9) == pytest.approx(0.35)
    assert roofline.roofline_tokens_per_s(70e6, 210e9) == pytest.approx(3000.0)
    with pytest.raises(ValueError):
        roofline.roofline_fraction(1000.0, 70e6, 0.0)


def test_model_shaped_rate_weights_each_shape_by_how_often_a_token_runs_it():
    shapes = [roofline.LinearShape("a", 10, 20, 3), roofline.LinearShape("b", 20, 5, 1)]
    times_s = {"a": 0.001, "b": 0.004}
    rows = 8
    flops = 2 * rows * (10 * 20 * 3 + 20 * 5 * 1)
    assert roofline.model_shaped_flops_per_s(times_s, shapes, rows) == pytest.approx(
        flops / (3 * 0.001 + 0.004)
    )


def _gemm(model_shaped: float, square: float) -> dict:
    return {
        "model_shaped_flops_per_s": model_shaped,
        "square_flops_per_s": square,
        "roofline_flops_per_s": max(model_shaped, square),
    }


def test_roofline_figures_judge_the_median_step_against_the_larger_gemm_rate():
    flops_per_token = 2 * 35_356_672
    step_s = 0.100  # 128 tokens per step: 1280 tokens/s
    figures = roofline_figures(LLAMA_50M_SPEC, _gemm(200e9, 300e9), [step_s] * 9 + [5.0], 128, 96.0)
    assert figures["engine"]["tokens_per_s_median"] == pytest.approx(1280.0)
    assert figures["fraction_of_roofline"] == pytest.approx(1280.0 * flops_per_token / 300e9)
    assert figures["fraction_of_model_shaped_gemm"] == pytest.approx(1280.0 * flops_per_token / 200e9)
    attention = 4 * 6 * 8 * 64 * 96.0
    assert figures["fraction_with_attention"] == pytest.approx(1280.0 * (flops_per_token + attention) / 300e9)
    assert figures["roofline_tokens_per_s"] == pytest.approx(300e9 / flops_per_token)
    assert figures["target_fraction"] == 0.35


# -- skewed workload -------------------------------------------------------------------------------------


def test_popularity_draws_are_seeded_and_favour_the_first_adapters():
    draws = popularity_draws(100, 1.0, 20_000, seed=3)
    assert draws == popularity_draws(100, 1.0, 20_000, seed=3)
    assert draws != popularity_draws(100, 1.0, 20_000, seed=4)
    assert set(draws) <= set(range(100))
    counts = Counter(draws)
    # p(k) ~ 1/(k+1): the head is drawn about ten times as often as adapter 9, and 100 times adapter 99
    assert counts[0] / 20_000 == pytest.approx(1 / sum(1 / k for k in range(1, 101)), rel=0.1)
    assert counts[0] > 5 * counts[9] > 0


def test_adapter_ceilings_read_each_distinct_adapters_factors_once_and_leave_lm_head_alone():
    spec = BaseModelSpec("tiny", "LlamaForCausalLM", 8, 16, 2, 2, 1, 4, 100)
    # per layer: q 8->8, k 8->4, v 8->4, o 8->8, gate 8->16, up 8->16, down 16->8
    per_layer_in_plus_out = (8 + 8) + (8 + 4) + (8 + 4) + (8 + 8) + (8 + 16) + (8 + 16) + (16 + 8)
    c = roofline.adapter_ceilings(spec, rank=4, distinct_adapters=3)
    assert c["lora_params_per_adapter"] == 4 * per_layer_in_plus_out * 2
    assert c["lora_params_read_per_step"] == 3 * c["lora_params_per_adapter"]
    base = roofline.linear_params_per_token(roofline.model_linear_shapes(spec))
    assert c["base_linear_params"] == base
    assert c["bandwidth_bound_ratio"] == pytest.approx(base / (base + 3 * c["lora_params_per_adapter"]))
    assert c["flop_bound_ratio"] == pytest.approx(base / (base + c["lora_params_per_adapter"]))
    # more distinct adapters in a step lower the bandwidth ceiling, never the FLOP one
    more = roofline.adapter_ceilings(spec, rank=4, distinct_adapters=6)
    assert more["bandwidth_bound_ratio"] < c["bandwidth_bound_ratio"]
    assert more["flop_bound_ratio"] == c["flop_bound_ratio"]


def test_streaming_bound_is_the_base_step_over_the_base_step_plus_the_factors_read_time():
    # a 40 ms base step and 120 MB of factors at 30 GB/s (4 ms): 40 / 44
    assert roofline.streaming_bound_ratio(0.040, 120e6, 30e9) == pytest.approx(40 / 44)
    assert roofline.streaming_bound_ratio(0.040, 0, 30e9) == 1.0  # no factors, no bound
    # more bytes, or a slower memory, lower it
    assert roofline.streaming_bound_ratio(0.040, 240e6, 30e9) < roofline.streaming_bound_ratio(
        0.040, 120e6, 30e9
    )
    assert roofline.streaming_bound_ratio(0.040, 120e6, 15e9) < roofline.streaming_bound_ratio(
        0.040, 120e6, 30e9
    )
    for bad in ((0, 1.0, 1.0), (0.04, -1.0, 1.0), (0.04, 1.0, 0)):
        with pytest.raises(ValueError):
            roofline.streaming_bound_ratio(*bad)


def test_read_bandwidth_is_bytes_over_the_time_of_a_sum_over_them(monkeypatch):
    clock = itertools.count(0.0, 0.5)  # a fake clock that moves half a second between two reads
    monkeypatch.setattr(roofline.time, "perf_counter", lambda: next(clock))
    assert roofline.measure_read_bandwidth(4096, min_seconds=0.0) == pytest.approx(4096 / 0.5)
    with pytest.raises(ValueError):
        roofline.measure_read_bandwidth(2, min_seconds=0.0)
