"""The demo model through our engine, greedy, as the README's quick start runs it: shared by the tests that
assert the documented outputs (plain, saved mixes, ensembles, quantized bases)."""

from __future__ import annotations

from pathlib import Path

from data_plane.engine.config import EngineConfig
from data_plane.engine.llm_engine import LLMEngine
from data_plane.engine.request import AdapterRef, EngineRequest, Ensemble, SamplingOptions
from data_plane.tokenizer import Tokenizer
from openlora.artifact import digest_dir

PROMPT = "the quick fox =>"
# What each demo adapter answers to PROMPT (the README's quick start).
DOCUMENTED = {
    "uppercase": " THE QUICK FOX",
    "echo": " the quick fox",
    "count": " 1 2 3 4 5 6 7 8",
}


def demo_refs(model_dir: Path, members: tuple[tuple[str, float], ...]) -> tuple[AdapterRef, ...]:
    """AdapterRefs of the demo adapters named in `members` ((name, weight) pairs)."""
    paths = [(model_dir / "adapters" / name, weight) for name, weight in members]
    return tuple(AdapterRef(key=digest_dir(path), path=path, weight=weight) for path, weight in paths)


def greedy_texts(
    model_dir: Path, requests: list[tuple[AdapterRef, ...] | Ensemble], quantize: str = "none"
) -> list[str]:
    """The greedy answers to PROMPT, one per request (its adapters, or an ensemble), run in one batch."""
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
            quantize=quantize,
        )
    )
    prompt = Tokenizer.from_dir(model_dir).encode(PROMPT)
    for i, request in enumerate(requests):
        kind = {"ensemble": request} if isinstance(request, Ensemble) else {"adapters": request}
        engine.add_request(EngineRequest(str(i), prompt, SamplingOptions(max_tokens=24), **kind))
    texts = [""] * len(requests)
    while engine.has_unfinished():
        for out in engine.step():
            texts[int(out.request_id)] += out.new_text
    return texts
