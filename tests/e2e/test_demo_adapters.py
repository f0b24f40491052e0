"""The default demo model, through our engine (greedy): each demo adapter does its documented task on the
README's prompt, and the README's mix says something of its own."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_plane.engine.config import EngineConfig
from data_plane.engine.llm_engine import LLMEngine
from data_plane.engine.request import AdapterRef, EngineRequest, SamplingOptions
from data_plane.tokenizer import Tokenizer
from openlora.artifact import digest_dir

PROMPT = "the quick fox =>"
DOCUMENTED = {
    "uppercase": " THE QUICK FOX",
    "echo": " the quick fox",
    "count": " 1 2 3 4 5 6 7 8",
}
MIX = (("count", 0.5), ("uppercase", 0.5))


def _greedy_text(model_dir: Path, adapters: tuple[tuple[str, float], ...]) -> str:
    engine = LLMEngine(
        EngineConfig(
            model_dir=model_dir,
            dtype="float32",
            num_kv_blocks=64,
            block_size=16,
            num_adapter_slots=4,
            max_lora_rank=16,
            max_num_seqs=4,
            max_num_batched_tokens=256,
        )
    )
    refs = tuple(
        AdapterRef(
            key=digest_dir(model_dir / "adapters" / name), path=model_dir / "adapters" / name, weight=w
        )
        for name, w in adapters
    )
    prompt = Tokenizer.from_dir(model_dir).encode(PROMPT)
    engine.add_request(EngineRequest("r", prompt, SamplingOptions(max_tokens=24), adapters=refs))
    text = ""
    while engine.has_unfinished():
        for out in engine.step():
            text += out.new_text
    return text


@pytest.mark.parametrize("task", sorted(DOCUMENTED))
def test_each_demo_adapter_gives_its_documented_answer(demo_model_dir, task):
    assert _greedy_text(demo_model_dir, ((task, 1.0),)) == DOCUMENTED[task]


def test_the_readme_mix_says_something_of_its_own(demo_model_dir):
    mixed = _greedy_text(demo_model_dir, MIX)
    assert mixed.strip()
    assert mixed not in {DOCUMENTED[name] for name, _ in MIX}
