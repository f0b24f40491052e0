"""The default demo model, through our engine (greedy): each demo adapter does its documented task on the
README's prompt, and the README's mix says something of its own."""

from __future__ import annotations

import pytest

from tests.demo_support import DOCUMENTED, demo_refs, greedy_texts

MIX = (("count", 0.5), ("uppercase", 0.5))


def _greedy_text(model_dir, members: tuple[tuple[str, float], ...]) -> str:
    return greedy_texts(model_dir, [demo_refs(model_dir, members)])[0]


@pytest.mark.parametrize("task", sorted(DOCUMENTED))
def test_each_demo_adapter_gives_its_documented_answer(demo_model_dir, task):
    assert _greedy_text(demo_model_dir, ((task, 1.0),)) == DOCUMENTED[task]


def test_the_readme_mix_says_something_of_its_own(demo_model_dir):
    mixed = _greedy_text(demo_model_dir, MIX)
    assert mixed.strip()
    assert mixed not in {DOCUMENTED[name] for name, _ in MIX}
