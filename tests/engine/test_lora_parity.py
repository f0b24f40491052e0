"""One batch mixing adapters of different ranks and targets (and no adapter) matches transformers + PEFT."""

from __future__ import annotations

import random

import pytest

from .conftest import ADAPTERS, greedy, make_engine, run_to_completion
from .reference import load_reference, reference_greedy


def _prompts(vocab_size: int, seed: int, lengths) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(n)] for n in lengths]


def _expected(model, cases) -> dict[str, tuple[list[int], list[float]]]:
    """cases: request id -> (prompt, adapter name or None); each run alone through transformers + PEFT."""
    expected = {}
    by_adapter: dict[str | None, list[str]] = {}
    for request_id, (_, name) in cases.items():
        by_adapter.setdefault(name, []).append(request_id)
    for name, request_ids in by_adapter.items():
        reference = load_reference(model.model_dir, [model.adapter_dirs[name]] if name else None)
        for request_id in request_ids:
            expected[request_id] = reference_greedy(reference, cases[request_id][0])
    return expected


def _assert_match(results, expected) -> None:
    for request_id, (want_tokens, want_logprobs) in expected.items():
        got_tokens, got_logprobs = results[request_id]
        assert got_tokens == want_tokens, request_id
        assert got_logprobs == pytest.approx(want_logprobs, abs=1e-3), request_id


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_qwen2", "tiny_qwen3"])
def test_mixed_adapter_batch_matches_peft_per_request(which, request):
    model = request.getfixturevalue(which)
    _check_mixed_batch(model, [*ADAPTERS, None, *ADAPTERS, None], 11, [3, 9, 21, 33, 6, 1, 14, 27, 2, 18])


def _check_mixed_batch(model, names, seed: int, lengths) -> None:
    """One engine batch of requests (prompt lengths `lengths`, adapters `names`, None: the base) gives each
    request PEFT's tokens and logprobs for it alone."""
    prompts = _prompts(model.vocab_size, seed, lengths)
    cases = {f"r{i}": (prompts[i], name) for i, name in enumerate(names)}
    engine = make_engine(model)
    for request_id, (prompt, name) in cases.items():
        engine.add_request(greedy(request_id, prompt, [model.ref(name)] if name else ()))
    results = run_to_completion(engine)
    _assert_match(results, _expected(model, cases))


@pytest.mark.parametrize("choice", ["auto", "reference"], ids=["native kernels", "torch reference"])
def test_both_cpu_implementations_match_peft(choice, tiny_llama, monkeypatch):
    """OPENLORA_KERNELS auto takes the native SGMV, decode attention and rotary kernels and oneDNN's matmul
    on the CPU (float32), reference the torch paths: both give PEFT's tokens, on prompt chunks long enough
    to go to torch and on decode steps."""
    from data_plane.model import dense
    from data_plane.model.native_lora import MAX_NATIVE_SEGMENT_ROWS, NativeLora
    from data_plane.model.quant.native import NativeDecodeTables, NativeKvSlots

    monkeypatch.setenv("OPENLORA_KERNELS", choice)
    calls, attended, written, matmuls = [], [], [], []
    onednn_linear = dense.onednn_linear
    monkeypatch.setattr(
        dense, "onednn_linear", lambda x, *args: matmuls.append(x.shape[0]) or onednn_linear(x, *args)
    )
    add, attend, write = NativeLora.add, NativeDecodeTables.attend, NativeKvSlots.rope_kv_write
    monkeypatch.setattr(NativeLora, "add", lambda self, *args: calls.append(self.long) or add(self, *args))
    monkeypatch.setattr(
        NativeDecodeTables,
        "attend",
        lambda self, *args: attended.append(args[0].shape) or attend(self, *args),
    )
    monkeypatch.setattr(
        NativeKvSlots, "rope_kv_write", lambda self, *args: written.append(self.count) or write(self, *args)
    )
    lengths = [MAX_NATIVE_SEGMENT_ROWS + 5, 9, 2, 14, 6, 1, 11, 3, 7]
    _check_mixed_batch(tiny_llama, [*ADAPTERS, None, *ADAPTERS], 5, lengths)
    if choice == "reference":
        assert calls == [] and attended == [] and written == [] and matmuls == []
    else:  # every projection of every step, a long prompt chunk among them; every decode row's attention;
        # the rotary and cache writes of every row (the first step holds whole prompts)
        assert calls and any(calls) and not all(calls)
        assert attended and max(shape[0] for shape in attended) == len(lengths)
        assert written and max(written) > max(lengths)
        assert matmuls and max(matmuls) > max(lengths)  # the projections and lm_head


def test_each_adapter_changes_the_output(tiny_llama):
    prompt = _prompts(tiny_llama.vocab_size, 3, [12])[0]
    engine = make_engine(tiny_llama)
    engine.add_request(greedy("base", prompt))
    for name in ADAPTERS:
        engine.add_request(greedy(name, prompt, [tiny_llama.ref(name)]))
    results = run_to_completion(engine)
    outputs = [tuple(tokens) for tokens, _ in results.values()]
    assert len(set(outputs)) == len(outputs)


def test_linear_mix_matches_peft_cat_combination(tiny_llama):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    prompt = _prompts(tiny_llama.vocab_size, 5, [10])[0]
    engine = make_engine(tiny_llama)
    mix = [tiny_llama.ref("r8_all", 0.7), tiny_llama.ref("r16_rslora", -0.4)]
    engine.add_request(greedy("mix", prompt, mix))
    engine.add_request(greedy("plain", prompt, [tiny_llama.ref("r8_all")]))
    results = run_to_completion(engine)

    base = AutoModelForCausalLM.from_pretrained(tiny_llama.model_dir)
    reference = PeftModel.from_pretrained(base, tiny_llama.adapter_dirs["r8_all"], adapter_name="a")
    reference.load_adapter(tiny_llama.adapter_dirs["r16_rslora"], adapter_name="b")
    reference.add_weighted_adapter(["a", "b"], [0.7, -0.4], "mix", combination_type="cat")
    reference.set_adapter("mix")
    want_tokens, want_logprobs = reference_greedy(reference.eval(), prompt)
    assert results["mix"][0] == want_tokens
    assert results["mix"][1] == pytest.approx(want_logprobs, abs=1e-3)
    assert results["mix"][0] != results["plain"][0]


def _mixed_cases(model, seed: int):
    names = [*ADAPTERS, None, "r8_all", None, "r64_all", "r4_qv"]
    prompts = _prompts(model.vocab_size, seed, [5, 30, 12, 47, 3, 19, 8, 25, 40])
    return {f"r{i}": (prompts[i], name) for i, name in enumerate(names)}


def _add(engine, model, cases, request_ids) -> None:
    for request_id in request_ids:
        prompt, name = cases[request_id]
        engine.add_request(greedy(request_id, prompt, [model.ref(name)] if name else ()))


def test_requests_joining_and_finishing_mid_run_keep_their_outputs(tiny_llama):
    cases = _mixed_cases(tiny_llama, 21)
    ids = list(cases)
    engine = make_engine(tiny_llama, max_num_batched_tokens=24)  # long prompts prefill in chunks
    results: dict[str, tuple[list[int], list[float]]] = {}
    _add(engine, tiny_llama, cases, ids[:3])
    pending = ids[3:]
    steps = 0
    while engine.has_unfinished() or pending:
        if pending and steps % 3 == 2:  # a new request joins every third step
            _add(engine, tiny_llama, cases, [pending.pop(0)])
        for out in engine.step():
            tokens, logprobs = results.setdefault(out.request_id, ([], []))
            tokens.extend(out.new_token_ids)
            logprobs.extend(out.new_logprobs or [])
        steps += 1
    _assert_match(results, _expected(tiny_llama, cases))


def test_outputs_survive_preemption_by_recompute(tiny_llama):
    cases = _mixed_cases(tiny_llama, 22)
    engine = make_engine(tiny_llama, num_kv_blocks=8)  # 128 token slots for 9 requests of up to 63 tokens
    _add(engine, tiny_llama, cases, list(cases))
    preempted = 0
    results: dict[str, tuple[list[int], list[float]]] = {}
    while engine.has_unfinished():
        before = sum(s.seq.num_preemptions for s in engine._states.values())
        outputs = engine.step()
        preempted = max(preempted, before)
        for out in outputs:
            tokens, logprobs = results.setdefault(out.request_id, ([], []))
            tokens.extend(out.new_token_ids)
            logprobs.extend(out.new_logprobs or [])
    assert preempted > 0
    _assert_match(results, _expected(tiny_llama, cases))


def test_outputs_survive_adapter_eviction_and_reload(tiny_llama):
    cases = _mixed_cases(tiny_llama, 23)
    engine = make_engine(tiny_llama, num_adapter_slots=2)  # four adapters through two slots
    loads = []
    real_submit = engine.loader.submit

    def counting_submit(key, members, **options):
        loads.append(key)
        real_submit(key, members, **options)

    engine.loader.submit = counting_submit
    _add(engine, tiny_llama, cases, list(cases))
    results = run_to_completion(engine)
    _add(engine, tiny_llama, {"again": cases["r0"]}, ["again"])  # r4_qv was evicted by now
    results.update(run_to_completion(engine))
    assert len(loads) > len(set(loads))  # some adapter was loaded, evicted and loaded again
    expected = _expected(tiny_llama, cases)
    expected["again"] = expected["r0"]
    _assert_match(results, expected)
