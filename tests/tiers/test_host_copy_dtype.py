"""A float32 engine keeps a float16 or bfloat16 adapter's host copy in the file's own dtype: half the host
memory per adapter, so the same host budget holds twice as many; on the native kernels its slot too (half
the bytes a step reads), with slot values (and so outputs) bit for bit those of reading the file as
float32. Mixes, float32 files and files of several dtypes stay in the engine's dtype."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from data_plane.adapters.peft_reader import host_dtype
from data_plane.engine.adapter_loader import host_copy_bytes
from data_plane.engine.request import AdapterRef
from data_plane.model.native_lora import MAX_NATIVE_SEGMENT_ROWS
from openlora.artifact import WEIGHTS_FILE, digest_dir
from tests.engine.conftest import greedy, make_engine, run_to_completion


def _copy_as(source: Path, target: Path, dtypes) -> Path:
    """`source` PEFT directory rewritten with tensor i in dtypes[i % len(dtypes)] (the same config)."""
    target.mkdir()
    for item in source.iterdir():
        if item.name != WEIGHTS_FILE:
            shutil.copy(item, target / item.name)
    tensors = load_file(source / WEIGHTS_FILE)
    converted = {
        name: tensors[name].to(dtypes[i % len(dtypes)]).contiguous() for i, name in enumerate(sorted(tensors))
    }
    save_file(converted, target / WEIGHTS_FILE)
    return target


def _ref(path: Path, weight: float = 1.0) -> AdapterRef:
    return AdapterRef(key=digest_dir(path), path=path, weight=weight)


@pytest.fixture(scope="module")
def variants(tiny_model, tmp_path_factory):
    """r8_all as float16, as bfloat16, as float32 holding the float16 (or bfloat16) values, and with two
    dtypes."""
    root = tmp_path_factory.mktemp("dtypes")
    source = tiny_model.adapter_dirs["r8_all"]
    half = _copy_as(source, root / "f16", [torch.float16])
    brain = _copy_as(source, root / "bf16", [torch.bfloat16])
    return {
        "f16": half,
        "bf16": brain,
        "f16_widened": _copy_as(half, root / "f16_widened", [torch.float32]),
        "bf16_widened": _copy_as(brain, root / "bf16_widened", [torch.float32]),
        "mixed": _copy_as(source, root / "mixed", [torch.float16, torch.float32]),
    }


def _serve(engine, ref: AdapterRef, request_id: str, prompt: list[int] | None = None):
    engine.add_request(greedy(request_id, prompt or [3, 4, 5, 6], [ref], max_tokens=6))
    return run_to_completion(engine)[request_id]


def test_host_dtype_keeps_only_what_widens_exactly():
    assert host_dtype("F16", torch.float32) == torch.float16
    assert host_dtype("BF16", torch.float32) == torch.bfloat16
    assert host_dtype("F32", torch.float32) == torch.float32
    assert host_dtype("mixed", torch.float32) == torch.float32
    # Under a half-precision engine the file is converted once, at the read, as before.
    assert host_dtype("F16", torch.bfloat16) == torch.bfloat16
    assert host_dtype("BF16", torch.float16) == torch.float16
    assert host_dtype("F32", torch.bfloat16) == torch.bfloat16


@pytest.mark.parametrize("half", ["f16", "bf16"])
def test_half_precision_file_is_held_in_its_dtype_and_serves_exactly_as_widened(tiny_model, variants, half):
    """Held in its own dtype in host memory and, where the native kernels read the slots, in the slot: a
    prompt long enough to go to torch's matmuls, then decode steps through the kernels, give the float32
    file's tokens and logprobs bit for bit."""
    dtype = {"f16": torch.float16, "bf16": torch.bfloat16}[half]
    engine = make_engine(tiny_model, host_cache_bytes=64 << 20)
    try:
        runner = engine.runner
        assert runner.packs_slots  # the test machine builds the native kernels
        narrow, widened = _ref(variants[half]), _ref(variants[f"{half}_widened"])
        prompt = [3 + i % 50 for i in range(MAX_NATIVE_SEGMENT_ROWS + 9)]
        tokens, logprobs = _serve(engine, narrow, "narrow", prompt)
        host = engine.adapter_cache.host_buffer(narrow.key)
        assert host.buffer.dtype == dtype
        assert engine.loader.estimate_host_bytes((narrow,)) == host.size_bytes
        wide_tokens, wide_logprobs = _serve(engine, widened, "widened", prompt)
        wide_host = engine.adapter_cache.host_buffer(widened.key)
        assert wide_host.buffer.dtype == torch.float32
        assert host.size_bytes * 2 == wide_host.size_bytes
        assert tokens == wide_tokens and logprobs == wide_logprobs  # bit for bit
        slot_narrow, slot_wide = (engine.adapter_cache.slot_of(r.key) for r in (narrow, widened))
        assert runner.slot_formats[slot_narrow] == dtype
        assert runner.slot_formats[slot_wide] == torch.float32
        # The slots hold the same values, the narrow one in half the bytes of its float32 slot.
        narrow_contents, wide_contents = runner.slot_contents(slot_narrow), runner.slot_contents(slot_wide)
        assert all(torch.equal(a, b) for a, b in zip(narrow_contents, wide_contents, strict=True))
        q = runner.model.model.layers[0].self_attn.qkv_proj
        assert not torch.equal(q.lora_a[slot_narrow], q.lora_a[slot_wide])
    finally:
        engine.shutdown()


def test_an_engine_started_on_the_torch_reference_widens_every_slot(tiny_model, variants, monkeypatch):
    """The reference reads float32 slots only: a 16-bit file there is widened into its slot."""
    monkeypatch.setenv("OPENLORA_KERNELS", "reference")
    engine = make_engine(tiny_model, host_cache_bytes=64 << 20)
    try:
        assert not engine.runner.packs_slots
        half = _ref(variants["f16"])
        _serve(engine, half, "half")
        assert engine.adapter_cache.host_buffer(half.key).buffer.dtype == torch.float16
        assert engine.runner.slot_formats[engine.adapter_cache.slot_of(half.key)] == torch.float32
    finally:
        engine.shutdown()


def test_the_same_host_budget_holds_twice_as_many_half_precision_adapters(tiny_model, variants):
    wide = _ref(variants["f16_widened"])
    one_float32_copy = host_copy_bytes((wide,), torch.float32)
    # One float32 copy's budget: both half-precision copies fit in it at once.
    engine = make_engine(tiny_model, host_cache_bytes=one_float32_copy, num_adapter_slots=1)
    try:
        half, bf16 = _ref(variants["f16"]), _ref(variants["bf16"])
        _serve(engine, half, "a")
        _serve(engine, bf16, "b")  # takes the only slot; the first stays in host memory
        assert engine.adapter_cache.on_host(half.key) and engine.adapter_cache.on_host(bf16.key)
        assert engine.adapter_cache.host_buffer(bf16.key).buffer.dtype == torch.bfloat16
        assert engine.adapter_cache.host_used_bytes <= one_float32_copy
    finally:
        engine.shutdown()


def test_mixes_and_mixed_dtype_files_are_held_in_the_engine_dtype(tiny_model, variants):
    engine = make_engine(tiny_model, host_cache_bytes=64 << 20)
    try:
        mixed = _ref(variants["mixed"])
        _serve(engine, mixed, "mixed")
        assert engine.adapter_cache.host_buffer(mixed.key).buffer.dtype == torch.float32
        assert engine.runner.slot_formats[engine.adapter_cache.slot_of(mixed.key)] == torch.float32
        assert (
            engine.loader.estimate_host_bytes((mixed,))
            == engine.adapter_cache.host_buffer(mixed.key).size_bytes
        )
        half_at_weight = _ref(variants["f16"], weight=0.5)  # a linear mix of one member
        assert engine.loader.estimate_host_bytes((half_at_weight,)) == host_copy_bytes(
            (_ref(variants["f16_widened"]),), torch.float32
        )
    finally:
        engine.shutdown()
