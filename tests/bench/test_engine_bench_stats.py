"""The engine benchmark's statistics on synthetic step times (no engine, no timing)."""

import pytest

from benchmarks.engine_bench import compare, percentile, step_stats


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
