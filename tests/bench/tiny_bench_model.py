"""A tiny Llama and PEFT adapters of several ranks written by benchmarks.fixtures, built once per session,
for running the engine benchmarks end to end in seconds."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from benchmarks.fixtures import AdapterSpec, ModelShape, ensure_adapters, ensure_model

TINY = ModelShape("bench-tiny", 64, 2, 128, 4, 2, 512, max_position_embeddings=512)
RANKS = (2, 4, 8)


@dataclass(frozen=True)
class TinyBenchModel:
    root: Path
    model_dir: Path
    adapters_by_rank: dict[int, list[Path]]


_BUILT: list[TinyBenchModel] = []


def tiny_bench_model(tmp_path_factory: pytest.TempPathFactory) -> TinyBenchModel:
    if not _BUILT:
        root = tmp_path_factory.mktemp("bench-fixtures")
        model_dir = ensure_model(TINY, root)
        adapters = {rank: ensure_adapters(6, TINY, AdapterSpec(rank=rank), root) for rank in RANKS}
        _BUILT.append(TinyBenchModel(root, model_dir, adapters))
    return _BUILT[0]


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Steps of a tiny model on one thread: on a shared, loaded machine two threads waiting on each other
    make every small op many times slower, and these tests time nothing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
