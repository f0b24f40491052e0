"""The demo-training thread benchmark runs the demo's own training step at each thread count."""

from __future__ import annotations

from benchmarks import demo_train_threads


def test_each_thread_count_gets_a_rate_per_pass():
    figures = demo_train_threads.main(["--steps", "2", "--passes", "1"])
    assert set(figures) == {1, 2} and all(len(r) == 1 and r[0] > 0 for r in figures.values())
