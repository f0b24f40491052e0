"""benchmarks/profile_step.py: the timer's arithmetic on a fake clock, and a real profile of a tiny model
whose parts add up to the step."""

from __future__ import annotations

import json

import pytest
from torch.nn import functional as F

import openlora_kernels as kernels
from benchmarks import profile_step
from benchmarks.profile_step import (
    ATTENTION,
    BASE,
    LOADS,
    LORA,
    OTHER,
    PARTS,
    SAMPLING,
    SCHEDULING,
    STEP_INPUTS,
    PartTimer,
    breakdown,
)
from benchmarks.steady_driver import SteadyDriver, make_engine
from tests.bench.tiny_bench_model import one_torch_thread, tiny_bench_model  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_each_part_gets_its_own_time_less_the_parts_nested_in_it():
    clock = FakeClock()
    timer = PartTimer(clock=clock)
    timer.enter(SCHEDULING)  # 0.0
    clock.now = 1.0
    timer.enter(STEP_INPUTS)  # 1.0
    clock.now = 1.5
    timer.enter(BASE)  # 1.5
    clock.now = 3.5
    timer.exit()  # base 2.0
    clock.now = 4.0
    timer.exit()  # step inputs 3.0 - 2.0
    clock.now = 4.25
    timer.exit()  # scheduling 4.25 - 3.0
    assert timer.seconds == {BASE: 2.0, STEP_INPUTS: 1.0, SCHEDULING: 1.25}
    assert sum(timer.seconds.values()) == 4.25


def test_nothing_inside_an_sgmv_op_is_counted_apart_from_lora():
    clock = FakeClock()
    timer = PartTimer(clock=clock)
    timer.enter(BASE)
    clock.now = 1.0
    timer.enter(LORA)
    clock.now = 2.0
    timer.enter(BASE)  # a linear the op runs inside is still LoRA time
    clock.now = 5.0
    timer.exit()
    timer.exit()
    clock.now = 6.0
    timer.exit()
    assert timer.seconds == {BASE: 2.0, LORA: 4.0}
    assert timer.calls == {BASE: 1, LORA: 1}


def test_breakdown_puts_what_the_named_parts_leave_in_other():
    seconds = {BASE: 4.0, LORA: 2.0, ATTENTION: 1.0, STEP_INPUTS: 0.5, SAMPLING: 0.25, SCHEDULING: 0.25}
    shares = breakdown({**seconds, LOADS: 1.0}, total_s=10.0)
    assert shares[BASE] == 0.4 and shares[LORA] == 0.2 and shares[LOADS] == 0.1
    assert shares[OTHER] == pytest.approx(0.1)
    assert sum(shares.values()) == pytest.approx(1.0)
    assert list(shares) == list(PARTS)
    with pytest.raises(ValueError):
        breakdown(seconds, 0.0)


def _check_parts(figures: dict, with_adapters: bool) -> None:
    shares = figures["parts_fraction"]
    assert set(shares) == set(PARTS)
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-9)
    ms = figures["parts_ms_per_step"]
    assert sum(ms.values()) == pytest.approx(figures["profiled"]["mean_step_ms"], rel=1e-9)
    # every named part ran and took time; other is what they leave, never negative
    for part in (BASE, ATTENTION, STEP_INPUTS, SAMPLING, SCHEDULING):
        assert shares[part] > 0, part
    assert shares[OTHER] >= 0
    assert (shares[LORA] > 0) is with_adapters
    assert figures["lora_seen"] is with_adapters


def test_profile_of_a_tiny_model_with_adapters_adds_up_and_is_taken_off_afterwards(
    tmp_path_factory, tmp_path
):
    model = tiny_bench_model(tmp_path_factory)
    adapters = [d for rank in (4, 8) for d in model.adapters_by_rank[rank]]
    linear, shrink, expand = F.linear, kernels.sgmv_shrink, kernels.sgmv_expand
    out = tmp_path / "profile.json"
    argv = ["--quick", "--model-dir", str(model.model_dir), "--adapter-dirs", *map(str, adapters)]
    result = profile_step.main([*argv, "--requests", "8", "--slots", "4", "--out", str(out)])
    assert json.loads(out.read_text())["parts_fraction"] == result["parts_fraction"]
    assert result["adapters"] == len(adapters) and result["steps"] == profile_step.QUICK["steps"]
    _check_parts(result, with_adapters=True)
    assert result["part_calls_per_step"][LORA] > 0
    assert result["part_calls_per_step"][LOADS] >= 1  # the wait for slot copies after every step
    # the timers are gone: the functions and hooks are the originals again
    assert (F.linear, kernels.sgmv_shrink, kernels.sgmv_expand) == (linear, shrink, expand)


def test_profile_without_adapters_has_no_lora_time(tmp_path_factory):
    model = tiny_bench_model(tmp_path_factory)
    figures = profile_step.run_profile(
        model.model_dir, None, steps=4, warmup_steps=2, decode_tokens=6, num_requests=8, num_slots=4
    )
    _check_parts(figures, with_adapters=False)
    assert figures["parts_fraction"][LORA] == 0.0
    table = profile_step.format_table(figures)
    assert all(part in table for part in PARTS) and "serving_overhead.py" in table


def test_instrument_times_fused_projections_by_type_and_takes_every_timer_off(tmp_path_factory):
    model = tiny_bench_model(tmp_path_factory)
    engine = make_engine(model.model_dir, 4, 8, max_lora_rank=8, num_slots=4)
    try:
        sampler = engine.sampler
        timer = PartTimer()
        remove = profile_step.instrument(engine, timer)
        modules = list(engine.runner.model.modules())
        timed = [m for m in modules if m._forward_pre_hooks]
        # every projection (fused or not: found by its LoRA pools), lm_head, attention and the model itself
        assert sum(hasattr(m, "lora_a") for m in timed) == sum(hasattr(m, "lora_a") for m in modules) > 0
        assert engine.runner.model.lm_head in timed and engine.runner.model in timed
        assert "step" in vars(engine) and "run" in vars(engine.runner)
        driver = SteadyDriver("t", engine, None, 4, num_requests=2)
        for _ in range(3):
            driver.step()
        assert timer.calls[SCHEDULING] == 3 and timer.calls[BASE] > 0 and timer.calls[ATTENTION] > 0
        remove()
        assert not any(m._forward_pre_hooks or m._forward_hooks for m in modules)
        assert "step" not in vars(engine) and "run" not in vars(engine.runner) and engine.sampler is sampler
    finally:
        engine.shutdown()
