"""Sampling options, stop strings, EOS and incremental detokenization on the demo model."""

from __future__ import annotations

import pytest
import torch

from data_plane.engine.request import EngineRequest, SamplingOptions
from data_plane.engine.sampler import (
    Sampler,
    apply_repetition_penalties,
    filter_top_k_top_p,
    filter_top_k_top_p_rows_,
)
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


def test_a_stop_string_found_when_the_last_tokens_text_is_flushed_finishes_with_stop(
    demo_dir, demo_tokenizer
):
    """The last token (max_tokens) completes a stop string and ends inside a character, so its text is
    only read when the request finishes: the finish reason is stop, not length (the decode below makes
    the last token end with an incomplete character, as byte-level vocabularies' tokens can)."""
    engine = make_engine(_Demo(demo_dir))
    prompt = demo_tokenizer.encode("the quick brown fox")
    full = _run_texts(engine, [EngineRequest("full", prompt, SamplingOptions(max_tokens=3))])["full"]
    last, text = full["ids"][-1], full["text"]
    assert len(text) >= 2 and text[-2:] == demo_tokenizer.decode(full["ids"])[-2:]
    decode = engine.tokenizer.decode
    engine.tokenizer.decode = lambda ids, **kw: (
        decode(ids, **kw) + ("\ufffd" if ids and ids[-1] == last else "")
    )
    stop = text[-2:]
    cut = _run_texts(engine, [EngineRequest("s", prompt, SamplingOptions(max_tokens=3, stop=(stop,)))])["s"]
    assert (cut["text"], cut["reason"]) == (text[: text.index(stop)], "stop")


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


@pytest.mark.parametrize("stop", [(), ("\u672c\u8a9e",), ("na",)])
def test_each_tokens_offset_places_it_in_the_text_a_split_character_where_it_begins(demo_tokenizer, stop):
    """The completions API's `text_offset`: summing each token's own decoded length counted a character
    split over three byte tokens as three (one U+FFFD each), so every later offset ran past its token, and
    the last ones past the text's end."""
    text = "caf\u00e9 \u65e5\u672c\u8a9e \U0001f642 na\u00efve"
    ids = demo_tokenizer.encode(text)
    detok = IncrementalDetokenizer(demo_tokenizer, [], stop)
    offsets = []
    for t in ids:
        detok.add(t)
        offsets.append(detok.last_offset)
        if detok.stopped:
            break
    detok.flush()
    out = detok.text
    assert out == (text[: text.index(stop[0])] if stop else text)
    assert len(ids) > len(text.split())  # byte tokens split some characters: what this test is about
    for i in range(len(offsets)):  # each token begins where the characters completed before it end
        begins = len(demo_tokenizer.decode(ids[:i]).rstrip("\ufffd"))
        assert offsets[i] == (min(begins, len(out)) if i == len(offsets) - 1 else begins), i
    assert offsets[-1] <= len(out)  # the token that completed a stop string begins at most at the cut
    if not stop:
        assert offsets == sorted(offsets) and offsets[-1] < len(text)
        assert text[offsets[-1] :] == demo_tokenizer.decode(ids[-1:])


def test_detokenizer_holds_back_a_possible_stop_string_prefix(demo_tokenizer):
    ids = demo_tokenizer.encode("one base model stays")
    detok = IncrementalDetokenizer(demo_tokenizer, [], ("model stays",))
    emitted = "".join(detok.add(t) for t in ids)
    assert detok.stopped and emitted == "one base "


# -- the batched sampler against the row-by-row sampler it replaced ----------------------------------------

_LIMIT = 1e30


def _reference_penalty(row: torch.Tensor, token_ids: list[int], penalty: float) -> None:
    if penalty == 1.0 or not token_ids:
        return
    penalty = min(max(penalty, torch.finfo(torch.float32).tiny), torch.finfo(torch.float32).max)
    seen = torch.tensor(sorted(set(token_ids)), dtype=torch.int64)
    values = row[seen]
    row[seen] = torch.where(values > 0, values / penalty, values * penalty).clamp(-_LIMIT, _LIMIT)


def _reference_filter(row: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if 0 < top_k < row.numel():
        row = row.masked_fill(row < torch.topk(row, top_k).values[-1], float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_ids = torch.sort(row, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        row = row.clone()
        row[sorted_ids[drop]] = float("-inf")
    return row


def _reference_sample(logits, options, generators, seen_token_ids):
    """One row at a time, as the sampler worked before it was batched: every row's log-probability."""
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    finite_max = torch.isfinite(logits.amax(dim=-1)).tolist()
    chosen, chosen_logprobs = [], []
    for i, opts in enumerate(options):
        if not finite_max[i]:
            chosen.append(None)
            chosen_logprobs.append(None)
            continue
        row = logits[i].clone()
        _reference_penalty(row, seen_token_ids[i], opts.repetition_penalty)
        if opts.temperature <= 0.0:
            token = int(torch.argmax(row))
        else:
            temperature = min(
                max(opts.temperature, torch.finfo(torch.float32).tiny), torch.finfo(torch.float32).max
            )
            row = _reference_filter((row - row.max()) / temperature, opts.top_k, opts.top_p)
            token = int(torch.multinomial(torch.softmax(row, dim=-1), 1, generator=generators[i]))
        chosen.append(token)
        chosen_logprobs.append(float(logprobs[i, token]))
    return chosen, chosen_logprobs


MIXED_ROWS = [  # (options, seen token ids, what is wrong with the row's logits)
    (SamplingOptions(), [], None),
    (SamplingOptions(logprobs=True), [], None),
    (SamplingOptions(repetition_penalty=1.8, logprobs=True), [4, 9, 9, 31, 200], None),
    (SamplingOptions(temperature=0.7, seed=1), [], None),
    (SamplingOptions(temperature=1.3, top_k=5, seed=2, logprobs=True), [], None),
    (SamplingOptions(temperature=0.9, top_p=0.8, seed=3), [], None),
    (SamplingOptions(temperature=1.0, top_k=40, top_p=0.6, seed=4, logprobs=True), [], None),
    (SamplingOptions(temperature=0.8, repetition_penalty=0.5, seed=5), [1, 2, 3, 250], None),
    (SamplingOptions(temperature=2.0, top_k=100000), [], None),  # unseeded: the shared generator
    (SamplingOptions(temperature=1e-40, logprobs=True), [], None),
    (SamplingOptions(temperature=1e30, top_p=0.95, seed=6), [], None),
    (SamplingOptions(temperature=0.6, top_k=1, seed=7), [], None),
    (SamplingOptions(logprobs=True), [], "nan"),
    (SamplingOptions(temperature=1.0, seed=8, logprobs=True), [], "inf"),
    (SamplingOptions(temperature=1.0, top_p=0.9, seed=9), [5], "all -inf"),
    (SamplingOptions(temperature=0.5), [], None),  # the shared generator again
    (SamplingOptions(repetition_penalty=1e300), [7, 8], "inf"),  # a seen +inf penalised is still unusable
]


def _mixed_batch(seed: int, vocab: int = 300):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(MIXED_ROWS), vocab, generator=gen) * 4
    for i, (_, seen, fault) in enumerate(MIXED_ROWS):
        if fault == "nan":
            logits[i, 17] = float("nan")
        elif fault == "inf":
            logits[i, seen[0] if seen else 3] = float("inf")
        elif fault == "all -inf":
            logits[i] = float("-inf")
    options = [o for o, _, _ in MIXED_ROWS]
    seen = [s for _, s, _ in MIXED_ROWS]
    return logits, options, seen


def _generators(options, seed: int) -> list[torch.Generator]:
    shared = torch.Generator().manual_seed(1000 + seed)
    return [
        shared if o.seed is None else torch.Generator().manual_seed(o.seed * 7919 + seed) for o in options
    ]


@pytest.mark.parametrize("seed", range(6))
def test_batched_sampler_picks_what_the_row_by_row_sampler_picked(seed):
    logits, options, seen = _mixed_batch(seed)
    ours_generators, their_generators = _generators(options, seed), _generators(options, seed)
    for _step in range(5):  # the seeded generators advance alike from step to step
        chosen, logprobs = Sampler()(logits, options, ours_generators, seen)
        want, want_logprobs = _reference_sample(logits, options, their_generators, seen)
        assert chosen == want
        assert [i for i, t in enumerate(chosen) if t is None] == [12, 13, 14, 16]
        for i, opts in enumerate(options):
            expected = want_logprobs[i] if opts.logprobs and want[i] is not None else None
            assert logprobs[i] == expected, i
        logits = logits.roll(1, dims=1)  # another step's logits, same faults per row
        for i, (_, _, fault) in enumerate(MIXED_ROWS):
            if fault == "inf" and seen[i]:
                logits[i] = logits[i].roll(-1)  # keep the +inf on the seen token


def test_batched_sampler_leaves_the_callers_logits_untouched():
    logits, options, seen = _mixed_batch(0)
    before = logits.clone()
    Sampler()(logits, options, _generators(options, 0), seen)
    assert torch.equal(logits.nan_to_num(), before.nan_to_num())


def test_a_seeded_row_samples_the_same_alone_and_in_a_mixed_batch():
    logits, options, seen = _mixed_batch(3)
    row = 6  # top-k 40 and top-p 0.6, seeded
    alone_generator = torch.Generator().manual_seed(99)
    alone = [
        Sampler()(logits[row : row + 1], [options[row]], [alone_generator], [seen[row]])[0][0]
        for _ in range(8)
    ]
    generators = _generators(options, 3)
    generators[row] = torch.Generator().manual_seed(99)
    together = [Sampler()(logits, options, generators, seen)[0][row] for _ in range(8)]
    assert together == alone and len(set(alone)) > 1


def test_rows_that_did_not_ask_for_logprobs_get_none():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(2))
    options = [
        SamplingOptions(),
        SamplingOptions(logprobs=True),
        SamplingOptions(temperature=1.0),
        SamplingOptions(),
    ]
    generators = [torch.Generator().manual_seed(i) for i in range(4)]
    chosen, logprobs = Sampler()(logits, options, generators, [[]] * 4)
    assert logprobs[0] is None and logprobs[2] is None and logprobs[3] is None
    assert logprobs[1] == pytest.approx(float(torch.log_softmax(logits[1], -1)[chosen[1]]))
    assert chosen[0] == int(logits[0].argmax()) and chosen[3] == int(logits[3].argmax())


def test_batched_top_k_top_p_and_penalties_equal_each_row_filtered_alone():
    logits = torch.randn(6, 80, generator=torch.Generator().manual_seed(4)) * 3
    top_k, top_p = [0, 3, 80, 10, 1, 25], [1.0, 1.0, 0.5, 0.9, 0.3, 0.99]
    batched = logits.clone()
    filter_top_k_top_p_rows_(batched, top_k, top_p)
    for r in range(6):
        assert torch.equal(batched[r], _reference_filter(logits[r], top_k[r], top_p[r])), r
    assert torch.isfinite(batched).sum(dim=1).tolist()[:2] == [80, 3]

    seen, penalties = [[1, 1, 5], [], [2, 79], [0, 3, 4, 60]], [1.5, 2.0, 0.25, 1.0]
    batched = logits.clone()
    apply_repetition_penalties(batched, [0, 2, 3, 5], seen, penalties)
    want = logits.clone()
    for row, ids, penalty in zip([0, 2, 3, 5], seen, penalties, strict=True):
        _reference_penalty(want[row], ids, penalty)
    assert torch.equal(batched, want) and not torch.equal(batched, logits)
