"""Through the model, a decode step of as many rows as the native CPU kernels take and of one more (int8:
NATIVE_MM_MAX_TOKENS = 8, past it the integer path; int4: 16, past it dequantized blocks and a float32
GEMM), with adapters whose LoRA is added into the base output in place: the packed kernels give the
logits of the reference kernels, whichever side of each switch a step falls on."""

from __future__ import annotations

import random
from collections import defaultdict

import pytest
import torch

from data_plane.engine.sequence import Sequence
from data_plane.model.quant import QuantSettings, int4, int8, native, set_reference_kernels

from .helpers import quantized_runner

PROMPT_LENGTH = 4  # tokens a sequence holds before its decode step: one KV block each


def _prefilled(num_seqs: int, vocab_size: int) -> list[Sequence]:
    """`num_seqs` sequences whose prompts but the last token are in the KV cache, a block each."""
    rng = random.Random(num_seqs)
    return [
        Sequence(
            f"s{i}", [rng.randrange(vocab_size) for _ in range(PROMPT_LENGTH)], PROMPT_LENGTH, block_ids=[i]
        )
        for i in range(num_seqs)
    ]


def _slots(num_seqs: int) -> list[int]:
    return [i % 3 - 1 for i in range(num_seqs)]  # no adapter, adapter 0, adapter 1 in turn


def _decode_step(runner, seqs: list[Sequence]) -> torch.Tensor:
    """(len(seqs), vocab) logits of one decode step: a row per sequence through every linear."""
    for seq in seqs:
        seq.num_computed_tokens = PROMPT_LENGTH - 1
    return runner.run(seqs, [1] * len(seqs), _slots(len(seqs)))[1]


def _rows_seen(monkeypatch) -> dict[str, list[int]]:
    """Kernel entry point -> the rows of its first argument in each call (x for the products; for the
    dequantization, which serves the GEMM path only, its weight's)."""
    seen: dict[str, list[int]] = defaultdict(list)
    for name in ("int8_mm", "int4_mm", "int4_dequantize"):
        method = getattr(native.NativeKernels, name)

        def spy(self, *args, _method=method, _name=name, **kwargs):
            seen[_name].append(
                args[0].shape[0] if isinstance(args[0], torch.Tensor) else args[0].out_features
            )
            return _method(self, *args, **kwargs)

        monkeypatch.setattr(native.NativeKernels, name, spy)
    return seen


@pytest.mark.parametrize(
    ("fmt", "num_seqs"),
    [
        ("int8", int8.NATIVE_MM_MAX_TOKENS),
        ("int8", int8.NATIVE_MM_MAX_TOKENS + 1),
        ("int4", int4.NATIVE_MM_MAX_TOKENS),
        ("int4", int4.NATIVE_MM_MAX_TOKENS + 1),
    ],
)
def test_a_decode_step_on_either_side_of_the_native_switch_gives_the_reference_logits(
    fmt, num_seqs, tiny_llama_q, monkeypatch, int8_fp32_path, int4_kernel
):
    monkeypatch.setenv("OPENLORA_KERNELS", "auto")
    int8_fp32_path(True, native_rows=True)  # past 8 rows the two-digit path, whatever this CPU measured
    int4_kernel("native")
    adapters = [tiny_llama_q.adapter_dirs[name] for name in list(tiny_llama_q.adapter_dirs)[:2]]
    runner = quantized_runner(tiny_llama_q.model_dir, QuantSettings(fmt, lm_head=True), adapters)
    # The prefill through the reference kernels, so both decode steps read the same cache.
    set_reference_kernels(runner.model, True)
    seqs = _prefilled(num_seqs, tiny_llama_q.vocab_size)
    runner.run(seqs, [PROMPT_LENGTH - 1] * num_seqs, _slots(num_seqs))
    want = _decode_step(runner, seqs)
    set_reference_kernels(runner.model, False)
    seen = _rows_seen(monkeypatch)
    got = _decode_step(runner, seqs)

    decode_rows = seen["int8_mm" if fmt == "int8" else "int4_mm"]
    native_step = num_seqs <= (int8 if fmt == "int8" else int4).NATIVE_MM_MAX_TOKENS
    assert set(decode_rows) == ({num_seqs} if native_step else set())  # the side of the switch it names
    if fmt == "int4":
        assert bool(seen["int4_dequantize"]) is not native_step
    # float32 throughout but for int8's two-digit path (16 bits an activation): within its own bound
    bound = 1e-3 if fmt == "int8" and not native_step else 1e-5
    error = float((got - want).abs().max() / want.abs().max())
    assert error < bound, error
