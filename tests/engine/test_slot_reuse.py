"""A slot written again holds exactly what a load into an untouched slot would: a load writes only the
ranks the slot's earlier loads may have touched (a rank-4 adapter in rank-64 pools is not 64 ranks of
writes), and that must never leave a predecessor's factors behind, whatever the ranks, the projections
adapted, the slot's format (float32, or an adapter's own float16 or bfloat16), or a load that failed
halfway."""

from __future__ import annotations

import pytest
import torch

from data_plane.adapters.host_buffer import pack
from data_plane.adapters.peft_reader import read_peft_adapter
from data_plane.adapters.weights import AdapterWeights, LoraFactors
from tests.engine.conftest import make_engine

HALF = {"_f16": torch.float16, "_bf16": torch.bfloat16}


def _weights(model, runner, name: str):
    for suffix, dtype in HALF.items():  # the same adapter in a 16-bit format (a slot of that format)
        if name.endswith(suffix):
            weights = _weights(model, runner, name.removesuffix(suffix))
            return AdapterWeights(
                weights.rank,
                {k: LoraFactors(f.a.to(dtype), f.b.to(dtype), f.scale) for k, f in weights.factors.items()},
            )
    if name.endswith("_x3"):  # the same shapes, other values and scales: a load replays the record
        weights = _weights(model, runner, name.removesuffix("_x3"))
        return AdapterWeights(
            weights.rank,
            {k: LoraFactors(f.a * 3.0, f.b * -2.0, f.scale / 3.0) for k, f in weights.factors.items()},
        )
    return read_peft_adapter(model.adapter_dirs[name], runner.model.config.spec, 64, torch.float32)


@pytest.fixture(scope="module")
def fresh(tiny_llama):
    """Each adapter's slot contents as loaded into a slot no load touched before."""
    engine = make_engine(tiny_llama)
    try:
        runner = engine.runner
        states = {}
        names = (
            "r4_qv",
            "r8_all",
            "r16_rslora",
            "r64_all",
            "r8_all_x3",
            "r4_qv_f16",
            "r64_all_bf16",
            "r8_all_f16",
        )
        for slot, name in enumerate(names):
            runner.load_adapter(slot, _weights(tiny_llama, runner, name))
            states[name] = runner.slot_contents(slot)
        return states
    finally:
        engine.shutdown()


def _assert_slot_is(runner, slot: int, expected: list[torch.Tensor]) -> None:
    actual = runner.slot_contents(slot)
    assert all(torch.equal(a, b) for a, b in zip(actual, expected, strict=True))


@pytest.mark.parametrize(
    "sequence",
    [
        ("r64_all", "r4_qv", "r16_rslora", "r8_all", "r64_all", "r4_qv"),
        ("r4_qv", "r8_all", "r16_rslora", "r64_all", "r16_rslora", "r4_qv"),
        ("r8_all", "r8_all_x3", "r8_all", "r8_all_x3", "r4_qv", "r8_all_x3"),
        # slots changing format: a 16-bit slot spans half the bytes of a float32 one
        ("r64_all", "r4_qv_f16", "r8_all", "r64_all_bf16", "r4_qv", "r8_all_f16", "r64_all", "r4_qv_f16"),
        ("r4_qv_f16", "r64_all_bf16", "r8_all_f16", "r4_qv", "r64_all_bf16", "r4_qv"),
    ],
)
def test_each_load_leaves_the_slot_as_a_load_into_an_untouched_slot(tiny_llama, fresh, sequence):
    engine = make_engine(tiny_llama)
    try:
        runner = engine.runner
        for name in sequence:
            runner.load_adapter(3, _weights(tiny_llama, runner, name))
            _assert_slot_is(runner, 3, fresh[name])
            assert runner.slot_ranks[3] == _weights(tiny_llama, runner, name).rank
            half = next((dtype for suffix, dtype in HALF.items() if name.endswith(suffix)), None)
            assert runner.slot_formats[3] == (half or torch.float32)
    finally:
        engine.shutdown()


def test_a_recorded_load_replayed_writes_the_new_adapters_factors_and_scales(tiny_llama, fresh):
    """The second load of the same shapes (and the same rank written before) into a slot replays the
    first one's record: the record must hold where to write, never what."""
    engine = make_engine(tiny_llama)
    try:
        runner = engine.runner
        for name in ("r8_all", "r8_all_x3", "r8_all", "r8_all_x3", "r8_all"):
            runner.install_from_host(2, pack(_weights(tiny_llama, runner, name), pin_memory=False))
            _assert_slot_is(runner, 2, fresh[name])
        assert len(runner._slot_plans) == 2  # (untouched slot, rank-8 shapes), (rank 8 written, the same)
    finally:
        engine.shutdown()


def test_a_load_that_failed_halfway_is_cleaned_by_the_next_smaller_one(tiny_llama, fresh, monkeypatch):
    """The rank-64 load's copies land, then the load fails; the rank-4 load after it must still zero the
    ranks the failed one wrote. Then the same with a 16-bit load after the failure and a float32 one after
    that: the float32 ranks past the 16-bit view still hold what the failed load wrote, and the last load
    must zero them."""
    engine = make_engine(tiny_llama)
    try:
        runner = engine.runner
        real_copy = torch._foreach_copy_

        def copy_then_fail(dst, src):
            real_copy(dst, src)
            raise RuntimeError("injected: the load failed after its copies")

        for then in (("r4_qv",), ("r4_qv_f16", "r4_qv")):
            with monkeypatch.context() as patch:
                patch.setattr(torch, "_foreach_copy_", copy_then_fail)
                with pytest.raises(RuntimeError, match="injected"):
                    runner.load_adapter(5, _weights(tiny_llama, runner, "r64_all"))
            for name in then:
                runner.load_adapter(5, _weights(tiny_llama, runner, name))
                _assert_slot_is(runner, 5, fresh[name])
    finally:
        engine.shutdown()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_each_install_from_host_leaves_the_slot_as_a_load_into_an_untouched_slot(tiny_llama, fresh):
    """The CUDA path: a pinned host copy staged on the load stream, then the device-side slot writes with
    the slot's high-water rank (run by benchmarks/gpu_check.sh)."""
    engine = make_engine(tiny_llama, device="cuda")
    try:
        runner = engine.runner
        names = (
            "r64_all",
            "r4_qv",
            "r16_rslora",
            "r8_all",
            "r8_all_x3",
            "r64_all",
            "r4_qv",
            "r8_all",
            "r8_all_x3",
        )
        for name in names:
            runner.install_from_host(3, pack(_weights(tiny_llama, runner, name), pin_memory=True))
            torch.cuda.synchronize()
            actual = [t.cpu() for t in runner.slot_contents(3)]
            assert all(torch.equal(a, b) for a, b in zip(actual, fresh[name], strict=True)), name
    finally:
        engine.shutdown()
