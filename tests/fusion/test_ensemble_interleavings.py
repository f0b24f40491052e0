"""Random interleavings of ensembles and ordinary requests with steps, invalidations and aborts through the
real engine (three slots and seven KV blocks force eviction and preemption of whole groups): every request
ends exactly once, with the tokens it gets in a roomy engine (or a clean abort), and no KV block, slot
reference or sequence is left behind."""

from __future__ import annotations

import random

import pytest

from data_plane.engine.request import EngineRequest, Ensemble, EnsembleMember, SamplingOptions
from tests.engine.conftest import make_engine, run_to_completion
from tests.fusion.merge_support import shared_model

MAX_TOKENS = 6
PROMPTS = [[7, 3, 9, 1, 4], [11, 2] * 7]  # 1 KV block, then 2 once it generates
# Each case: ensemble members as (adapter name or None, weight), or one adapter name (None: the base).
CASES = [
    (("r4_qv", 0.5), ("r8_all", 0.5)),
    ((None, 0.3), ("r16_rslora", 0.3), ("r64_all", 0.4)),
    (("r8_all", 1.0), (None, 2.0), ("r4_qv", 1.0)),
    "r64_all",
    "r16_rslora",
    None,
]
NAMES = ["r4_qv", "r8_all", "r16_rslora", "r64_all"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return shared_model(tmp_path_factory)


def _request(model, request_id: str, case, prompt: list[int]) -> EngineRequest:
    sampling = SamplingOptions(max_tokens=MAX_TOKENS)
    if isinstance(case, tuple):
        members = tuple(EnsembleMember(model.ref(n) if n else None, w) for n, w in case)
        return EngineRequest(request_id, list(prompt), sampling, ensemble=Ensemble(members, "probs"))
    return EngineRequest(request_id, list(prompt), sampling, (model.ref(case),) if case else ())


@pytest.fixture(scope="module")
def expected(model):
    """(case index, prompt index) -> tokens of that request in an engine with room for everything."""
    engine = make_engine(model)
    for c, case in enumerate(CASES):
        for p, prompt in enumerate(PROMPTS):
            engine.add_request(_request(model, f"{c}-{p}", case, prompt))
    results = run_to_completion(engine)
    engine.shutdown()
    return {tuple(map(int, rid.split("-"))): tokens for rid, (tokens, _) in results.items()}


@pytest.mark.parametrize("seed", range(6))
def test_random_interleavings_end_each_request_once_with_its_tokens_and_leak_nothing(model, expected, seed):
    rng = random.Random(seed)
    engine = make_engine(model, num_adapter_slots=3, num_kv_blocks=7, max_num_seqs=6)
    cases: dict[str, tuple[int, int]] = {}
    tokens: dict[str, list[int]] = {}
    ended: dict[str, str] = {}
    aborted: set[str] = set()
    for i in range(rng.randint(4, 9)):
        request_id = f"q{i}"
        cases[request_id] = (rng.randrange(len(CASES)), rng.randrange(len(PROMPTS)))
        engine.add_request(
            _request(model, request_id, CASES[cases[request_id][0]], PROMPTS[cases[request_id][1]])
        )
    for _ in range(2000):
        if not engine.has_unfinished():
            break
        action = rng.random()
        if action < 0.08:
            engine.invalidate(model.ref(rng.choice(NAMES)).key)
        elif action < 0.11:
            live = sorted(set(cases) - set(ended) - aborted)
            if live:
                request_id = rng.choice(live)
                aborted.add(request_id)
                engine.abort(request_id)
        for out in engine.step():
            assert out.error is None, out.error
            assert out.request_id not in ended, f"{out.request_id} ended twice"
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                ended[out.request_id] = out.finish_reason
    assert not engine.has_unfinished()
    assert set(ended) == set(cases)
    for request_id, case in cases.items():
        if ended[request_id] == "abort":
            assert request_id in aborted
            assert tokens[request_id] == expected[case][: len(tokens[request_id])]
        else:
            assert tokens[request_id] == expected[case], (request_id, case)
    scheduler = engine.scheduler
    assert scheduler.blocks.num_free_blocks == scheduler.blocks.num_blocks
    assert not scheduler.running and not scheduler.waiting
    assert all(engine.adapter_cache.refcount(model.ref(name).key) == 0 for name in NAMES)
    engine.shutdown()
