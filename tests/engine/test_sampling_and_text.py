"""Sampling options, stop strings, EOS and incremental detokenization on the demo model."""

from __future__ import annotations

import pytest
import torch

from data_plane.engine.request import EngineRequest, SamplingOptions
from data_plane.engine.sampler import Sampler, filter_top_k_top_p
from data_plane.tokenizer import IncrementalDetokenizer, Tokenizer

from .conftest import make_engine


@pytest.fixture(scope="session")
def demo_dir(demo_model_dir):
    return demo_model_dir


@pytest.fixture(scope="session")
def demo_tokenizer(demo_dir) -> Tokenizer:
    return Tokenizer.from_dir(demo_dir)


class _Demo:
    def __init__(self, model_dir):
        self.model_dir = model_dir


def _run_texts(engine, requests) -> dict[str, dict]:
    for r in requests:
        engine.add_request(r)
    results: dict[str, dict] = {}
    while engine.has_unfinished():
        for out in engine.step():
            entry = results.setdefault(out.request_id, {"ids": [], "text": "", "reason": None})
            entry["ids"] += out.new_token_ids
            entry["text"] += out.new_text
            entry["reason"] = out.finish_reason
    return results


def test_same_seed_gives_the_same_sample_whatever_the_batch(demo_dir, demo_tokenizer):
    prompt = demo_tokenizer.encode("the quick brown")
    options = SamplingOptions(temperature=5.0, max_tokens=12, seed=42)
    engine = make_engine(_Demo(demo_dir))
    alone = _run_texts(engine, [EngineRequest("a", prompt, options)])["a"]["ids"]
    crowd = [
        EngineRequest(f"other{i}", prompt, SamplingOptions(temperature=5.0, max_tokens=12)) for i in range(3)
    ]
    together = _run_texts(engine, [*crowd, EngineRequest("b", prompt, options)])
    assert together["b"]["ids"] == alone
    other = _run_texts(
        engine, [EngineRequest("c", prompt, SamplingOptions(temperature=5.0, max_tokens=12, seed=7))]
    )
    assert other["c"]["ids"] != alone


def test_top_k_one_is_greedy(demo_dir, demo_tokenizer):
    prompt = demo_tokenizer.encode("adapters are")
    engine = make_engine(_Demo(demo_dir))
    results = _run_texts(
        engine,
        [
            EngineRequest("greedy", prompt, SamplingOptions(max_tokens=10)),
            EngineRequest("topk1", prompt, SamplingOptions(temperature=2.0, top_k=1, max_tokens=10, seed=3)),
        ],
    )
    assert results["greedy"]["ids"] == results["topk1"]["ids"]


def test_top_k_and_top_p_keep_only_the_allowed_tokens():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    kept = filter_top_k_top_p(logits, top_k=2, top_p=1.0)
    assert torch.isfinite(kept).tolist() == [True, True, False, False, False]
    probs = torch.softmax(logits, dim=-1)  # 0.64, 0.24, 0.09, ...
    kept = filter_top_k_top_p(logits, top_k=0, top_p=0.8)
    assert torch.isfinite(kept).tolist() == [True, True, False, False, False]
    assert probs[0] < 0.8
    kept = filter_top_k_top_p(logits, top_k=0, top_p=0.5)
    assert torch.isfinite(kept).tolist() == [True, False, False, False, False]
    generator = torch.Generator().manual_seed(0)
    sampler = Sampler()
    options = [SamplingOptions(temperature=1.0, top_k=2)] * 200
    chosen, _ = sampler(logits.repeat(200, 1), options, [generator] * 200, [[]] * 200)
    assert set(chosen) == {0, 1}


def test_max_tokens_finishes_with_length(demo_dir, demo_tokenizer):
    engine = make_engine(_Demo(demo_dir))
    results = _run_texts(
        engine, [EngineRequest("a", demo_tokenizer.encode("one base"), SamplingOptions(max_tokens=3))]
    )
    assert len(results["a"]["ids"]) == 3 and results["a"]["reason"] == "length"


def test_eos_finishes_with_stop(demo_dir, demo_tokenizer):
    engine = make_engine(_Demo(demo_dir))
    # The demo base model learnt its text line by line: it ends the first line with EOS.
    results = _run_texts(
        engine,
        [EngineRequest("a", demo_tokenizer.encode("the quick brown fox"), SamplingOptions(max_tokens=64))],
    )
    assert results["a"]["reason"] == "stop" and results["a"]["ids"][-1] == 2
    assert len(results["a"]["ids"]) < 64


def test_stop_string_ends_the_text_before_it(demo_dir, demo_tokenizer):
    engine = make_engine(_Demo(demo_dir))
    prompt = demo_tokenizer.encode("the quick brown fox")
    full = _run_texts(engine, [EngineRequest("full", prompt, SamplingOptions(max_tokens=20))])["full"]["text"]
    assert "lazy" in full
    stopped = _run_texts(
        engine, [EngineRequest("s", prompt, SamplingOptions(max_tokens=20, stop=("lazy",)))]
    )["s"]
    assert stopped["reason"] == "stop"
    assert stopped["text"] == full[: full.index("lazy")]


def test_detokenizer_never_emits_a_broken_character(demo_tokenizer):
    text = "caf\u00e9 \u65e5\u672c\u8a9e \U0001f642 na\u00efve"
    ids = demo_tokenizer.encode(text)
    detok = IncrementalDetokenizer(demo_tokenizer, [], ())
    pieces = [detok.add(t) for t in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # Byte-level tokens split the emoji: some step must have held text back.
    assert len(ids) > len(text.split()) and "" in pieces[:-1]


def test_detokenizer_holds_back_a_possible_stop_string_prefix(demo_tokenizer):
    ids = demo_tokenizer.encode("one base model stays")
    detok = IncrementalDetokenizer(demo_tokenizer, [], ("model stays",))
    emitted = "".join(detok.add(t) for t in ids)
    assert detok.stopped and emitted == "one base "
