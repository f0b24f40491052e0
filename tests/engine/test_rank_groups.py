"""The reference path applies a step's LoRA in rank groups, so that rows of small adapters are not computed at
the rank of the largest adapter in the step (the skewed case of engine_bench: ranks 8, 16 and 64 together)."""

from __future__ import annotations

from data_plane.engine.model_runner import rank_groups


def test_a_rank_joins_the_group_above_while_at_least_half_its_top():
    assert rank_groups([8, 16, 64]) == {64: 64, 16: 16, 8: 16}
    assert rank_groups([4, 8, 16, 64]) == {64: 64, 16: 16, 8: 16, 4: 4}
    assert rank_groups([33, 64]) == {64: 64, 33: 64}
    assert rank_groups([32, 64]) == {64: 64, 32: 64}
    assert rank_groups([31, 64]) == {64: 64, 31: 31}


def test_one_rank_or_close_ranks_make_one_group():
    assert rank_groups([16, 16, 16]) == {16: 16}
    assert set(rank_groups([12, 16, 9]).values()) == {16}
