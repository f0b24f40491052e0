"""What one adapter load costs the worker's loader threads on the CPU engine: the read from the worker's disk
(validation, then the tensors) and the copy of a host copy into a slot.

    python -m benchmarks.adapter_load_bench                 # idle machine
    python -m benchmarks.adapter_load_bench --contended     # beside a thread of 2-thread matmuls (a step's)

Adapters: the benchmark fixtures' (`benchmarks.fixtures.LLAMA_50M`: rank 16 on all seven projections of 6
layers, float16 files of 1.9 MB), engine dtype float32, slots of the worker's default maximum rank (64).
Pairs measured alternately, `--repeats` times each,
over `--adapters` distinct adapters, median and p90 in milliseconds:
- read, validated: `read_packed_adapter` (a disk load's read into its host buffer) with the validation
  memo emptied first (a first read);
- read, unchanged files: `read_packed_adapter` of a directory validated before (a read again from disk);
- read by tensor, unchanged files: the same read as it was before the one-read path, kept as the
  baseline (`read_peft_adapter` tensor by tensor, then `pack`);
- slot copy, per operation: the copy as it was before `SlotWrites` (per projection and layer: zero the
  slot's A and B, copy A and B, set the scale), kept here as the baseline;
- slot copy, batched: `ModelRunner.install_from_host` (foreach copies, and fills of the ranks an earlier
  load of the slot wrote past the adapter's own).
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import torch

from benchmarks import fixtures
from benchmarks.steady_driver import adapter_refs, make_engine
from data_plane.adapters import peft_reader
from data_plane.adapters.host_buffer import pack, unpack
from data_plane.engine.config import EngineConfig
from data_plane.engine.model_runner import PROJECTIONS

# The slots' maximum rank: the worker's default, so a rank-16 copy lands in pools as wide as served ones.
MAX_LORA_RANK = EngineConfig.max_lora_rank


def copy_per_operation(runner, slot: int, host) -> None:
    """The slot copy before SlotWrites: several small operations per projection and layer."""
    weights = unpack(host)
    for layer in range(len(runner.model.model.layers)):
        targets = runner.model.lora_targets(layer)
        for name in PROJECTIONS:
            module, index = targets[name]
            factors = weights.factors.get((layer, name))
            a_pool = module.lora_a[slot].view(module.max_rank, module.num_slices, module.in_features)[
                :, index
            ]
            b_pool = module.lora_b[index][slot]
            a_pool.zero_()
            b_pool.zero_()
            if factors is None:
                module.lora_scale[index, slot] = 0.0
                continue
            rank = factors.a.shape[0]
            a_pool[:rank].copy_(factors.a)
            b_pool[:, :rank].copy_(factors.b)
            module.lora_scale[index, slot] = factors.scale


def _check_same_slot(runner, host) -> None:
    """Both copies leave a slot bit for bit the same (the baseline is the old behaviour, not another): the
    batched copy into an untouched slot and into the slot the per-operation copy wrote."""
    copy_per_operation(runner, 1, host)
    expected = runner.slot_contents(1)  # clones
    for slot in (2, 1):
        runner.install_from_host(slot, host)
        if not all(torch.equal(a, b) for a, b in zip(expected, runner.slot_contents(slot), strict=True)):
            raise AssertionError(f"the batched slot copy into slot {slot} differs from the per-operation one")


def _busy(stop: threading.Event) -> None:
    a, b = torch.randn(128, 512), torch.randn(1376, 512)
    while not stop.is_set():
        for _ in range(20):
            a @ b.T


def median_p90(values: list[float]) -> dict:
    """Median, p90 and count of a list of timings."""
    ordered = sorted(values)
    return {
        "p50": statistics.median(ordered),
        "p90": ordered[int(0.9 * (len(ordered) - 1))],
        "n": len(ordered),
    }


def run(num_adapters: int, repeats: int, contended: bool) -> dict:
    torch.set_num_threads(2)
    model = fixtures.ensure_model(fixtures.LLAMA_50M)
    refs = adapter_refs(fixtures.ensure_adapters(num_adapters, fixtures.LLAMA_50M))
    engine = make_engine(model, 8, 16, MAX_LORA_RANK, 8)
    runner = engine.runner
    spec = engine.spec

    def read(ref):
        return peft_reader.read_packed_adapter(ref.path, spec, MAX_LORA_RANK, torch.float32)

    def read_by_tensor(ref):
        weights = peft_reader.read_peft_adapter(
            ref.path, spec, MAX_LORA_RANK, torch.float32, keep_exact_dtype=True
        )
        return pack(weights, False)

    hosts = [read(ref) for ref in refs]
    times: dict[str, list[float]] = {
        k: [] for k in ("read_validated", "read_unchanged", "read_by_tensor", "copy_per_op", "copy_batched")
    }
    _check_same_slot(runner, hosts[0])
    stop = threading.Event()
    busy = threading.Thread(target=_busy, args=(stop,), daemon=True)
    if contended:
        busy.start()
    try:
        for _ in range(repeats):
            for i, ref in enumerate(refs):
                peft_reader.forget_validations()
                t0 = time.perf_counter()
                read(ref)
                t1 = time.perf_counter()
                read(ref)
                t2 = time.perf_counter()
                read_by_tensor(ref)
                t3 = time.perf_counter()
                copy_per_operation(runner, 1, hosts[i])
                t4 = time.perf_counter()
                runner.install_from_host(1, hosts[i])
                t5 = time.perf_counter()
                spans = ((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5))
                for key, (a, b) in zip(times, spans, strict=True):
                    times[key].append((b - a) * 1000)
    finally:
        stop.set()
    return {key: median_p90(values) for key, values in times.items()} | {
        "adapter_bytes_on_host": hosts[0].size_bytes,
        "contended": contended,
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--contended", action="store_true", help="beside a thread of 2-thread matmuls")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    result = run(args.adapters, args.repeats, args.contended)
    for key in ("read_validated", "read_unchanged", "read_by_tensor", "copy_per_op", "copy_batched"):
        s = result[key]
        print(f"{key:15s} p50 {s['p50']:6.2f} ms  p90 {s['p90']:6.2f} ms  (n={s['n']})")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
