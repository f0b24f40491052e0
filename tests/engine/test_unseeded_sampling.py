"""Requests without a seed: each samples from a generator of its own, so its tokens never depend on what
other requests (another tenant's) drew beside it, and without an engine seed they differ from one process
start to the next (every worker started from seed 0 and replayed the same "random" output after each
restart). An engine seed makes unseeded output reproducible, for tests and benchmarks."""

from __future__ import annotations

from data_plane.engine.request import EngineRequest, SamplingOptions

from .conftest import make_engine, run_to_completion

PROMPT = [3, 17, 42, 9]


def _unseeded(request_id: str, max_tokens: int = 12) -> EngineRequest:
    return EngineRequest(request_id, PROMPT, SamplingOptions(temperature=5.0, max_tokens=max_tokens))


def _tokens(engine, requests) -> dict[str, list[int]]:
    for request in requests:
        engine.add_request(request)
    return {request_id: tokens for request_id, (tokens, _) in run_to_completion(engine).items()}


def test_unseeded_output_differs_between_engine_starts(tiny_llama):
    outputs = []
    for _ in range(2):
        engine = make_engine(tiny_llama)
        try:
            outputs.append(_tokens(engine, [_unseeded("first")])["first"])
        finally:
            engine.shutdown()
    # 12 draws at temperature 5 over a 256-token vocabulary: equal by chance about never.
    assert outputs[0] != outputs[1]


def test_an_engine_seed_makes_unseeded_output_reproducible(tiny_llama):
    outputs = []
    for _ in range(2):
        engine = make_engine(tiny_llama, seed=1234)
        try:
            outputs.append(_tokens(engine, [_unseeded("first")])["first"])
        finally:
            engine.shutdown()
    assert outputs[0] == outputs[1]


def test_an_unseeded_requests_tokens_do_not_depend_on_other_requests_draws(tiny_llama):
    alone_engine = make_engine(tiny_llama, seed=99)
    crowded_engine = make_engine(tiny_llama, seed=99)
    try:
        alone = _tokens(alone_engine, [_unseeded("mine")])["mine"]
        # Added after it, so it gets the same per-request seed; the others draw at every step beside it.
        crowd = [_unseeded(f"other{i}", max_tokens=20) for i in range(3)]
        together = _tokens(crowded_engine, [_unseeded("mine"), *crowd])
        assert together["mine"] == alone
    finally:
        alone_engine.shutdown()
        crowded_engine.shutdown()
