"""A request whose K/V overflowed (an adapter or mix weight too large for float32) leaves nothing behind in
the shared KV cache: the next request on its blocks, and a request whose block table is padded while it ran,
get the same tokens as on a fresh engine. Before freed blocks were zeroed and tables padded with a reserved
zero block, the CPU decode attention read the stale infinities under its mask and every later request on
those blocks failed with non-finite logits, blamed on its own prompt."""

from __future__ import annotations

import torch

from data_plane.engine.errors import NonFiniteLogits

from .conftest import greedy, make_engine, run_to_completion

HUGE = 3e38  # finite in float32: accepted as a mix weight, overflows K and V


def _poison(tiny_llama):
    """A 40-token request on an adapter whose weight makes K and V infinite; it fails at its first sample."""
    return greedy("poison", list(range(3, 43)), [tiny_llama.ref("r8_all", weight=HUGE)], max_tokens=4)


def _victims():
    # Short prompts (their last block mostly unwritten) beside long ones: more lengths than the CPU decode
    # attention has groups, so short tables are padded to longer ones.
    return [
        greedy(f"v{n}", list(range(5, 5 + n)), max_tokens=12 if n > 20 else 24)
        for n in (3, 5, 9, 14, 30, 41, 51)
    ]


def _clean_tokens(tiny_llama, **settings) -> dict[str, list[int]]:
    engine = make_engine(tiny_llama, **settings)
    for request in _victims():
        engine.add_request(request)
    return {rid: tokens for rid, (tokens, _) in run_to_completion(engine).items()}


def test_requests_after_an_overflowing_one_reuse_its_blocks_unharmed(tiny_llama) -> None:
    settings = dict(num_kv_blocks=8)  # 128 tokens: the victims must take the poisoned blocks
    want = _clean_tokens(tiny_llama, **settings)
    engine = make_engine(tiny_llama, **settings)
    engine.add_request(_poison(tiny_llama))
    failed = [o for o in engine.step() + engine.step() if o.request_id == "poison"]
    assert failed and isinstance(failed[-1].error, NonFiniteLogits)
    k_cache = engine.runner.model.model.layers[0].self_attn.k_cache
    assert not torch.isfinite(k_cache).all(), "the poisoned request should have left non-finite K behind"
    for request in _victims():
        engine.add_request(request)
    got = run_to_completion(engine)
    assert {rid: tokens for rid, (tokens, _) in got.items()} == want
    assert all(o.error is None for o in engine.step())


def test_every_block_a_step_can_read_past_a_context_holds_zeros(tiny_llama) -> None:
    """The invariant that makes the masked reads harmless: at each forward, every block outside the running
    sequences (free ones, which a step may hand out, and the padding block decode tables point at) is zero,
    while the overflowing request and the others run side by side."""
    engine = make_engine(tiny_llama)
    runner = engine.runner
    seen_padding = []
    original_run = runner.run

    def checked_run(seqs, num_tokens, slots):
        held = {b for seq in engine.scheduler.running for b in seq.block_ids}
        idle = [b for b in range(runner.num_kv_blocks + 1) if b not in held]
        assert runner.pad_block in idle
        for layer in runner.model.model.layers:
            for cache in (layer.self_attn.k_cache, layer.self_attn.v_cache):
                assert not cache[idle].any(), "a block no running sequence holds is not zero"
        seen_padding.append(len({len(seq.block_ids) for seq in seqs}) > 1)
        return original_run(seqs, num_tokens, slots)

    runner.run = checked_run
    engine.add_request(_poison(tiny_llama))
    for request in _victims():
        engine.add_request(request)
    errors = {}
    while engine.has_unfinished():
        errors.update({o.request_id: o.error for o in engine.step() if o.error is not None})
    assert set(errors) == {"poison"} and isinstance(errors["poison"], NonFiniteLogits)
    assert any(seen_padding)


def test_the_forward_runs_in_inference_mode(tiny_llama) -> None:
    """No autograd bookkeeping on the step's tensors (a decorator lost in a refactor once left `run` without
    it)."""
    engine = make_engine(tiny_llama)
    model = engine.runner.model
    seen = []
    forward = model.forward

    def recording(*args, **kwargs):
        seen.append(torch.is_inference_mode_enabled())
        return forward(*args, **kwargs)

    model.forward = recording
    engine.add_request(greedy("x", [5, 6, 7], max_tokens=3))
    run_to_completion(engine)
    assert seen and all(seen)
