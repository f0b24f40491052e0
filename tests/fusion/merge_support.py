"""Shared by the merge tests: the engine tests' tiny Llama with PEFT adapters of different ranks and
target modules, and a helper building a merge of them with data_plane.fusion."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data_plane.fusion import store as store_module
from data_plane.fusion.builder import MergeReport, build_merge
from data_plane.fusion.spec import MergeSpec
from openlora.artifact import WEIGHTS_FILE, digest_dir
from tests.engine.conftest import TinyModel, _build

# r4 on q, v; r8 on all seven; r16 rsLoRA on k, o, gate, down.
SOURCES = ("r4_qv", "r8_all", "r16_rslora")


_MODEL: list[TinyModel] = []


def shared_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """Built once per session, whichever merge test module asks first (each wraps it in a fixture)."""
    if not _MODEL:
        _MODEL.append(_build(tmp_path_factory.mktemp("merge"), "llama"))
    return _MODEL[0]


def spec_of(model: TinyModel, weights: dict[str, float], method: str, **options) -> MergeSpec:
    shas = {name: digest_dir(model.adapter_dirs[name]) for name in weights}
    spec = MergeSpec.of([(shas[n], w) for n, w in weights.items()], method, **options)
    return spec.with_paths({shas[n]: model.adapter_dirs[n] for n in weights})


def build(model: TinyModel, out: Path, weights: dict[str, float], method: str, max_rank: int = 64, **options):
    """Builds the merge into `out`; returns (report, {(layer, module): merged delta B @ A})."""
    report: MergeReport = build_merge(spec_of(model, weights, method, **options), out, max_rank)
    return report, deltas_of(out)


def deltas_of(adapter_dir: Path) -> dict[tuple[int, str], torch.Tensor]:
    """(layer, module) -> B @ A of a derived adapter (its scale is 1)."""
    tensors = load_file(str(adapter_dir / WEIGHTS_FILE))
    deltas = {}
    for name, a in tensors.items():
        if ".lora_A." not in name:
            continue
        parts = name.split(".")
        layer, module = int(parts[4]), parts[6]
        deltas[(layer, module)] = tensors[name.replace("lora_A", "lora_B")].float() @ a.float()
    return deltas


def build_in_fresh_process(spec_json: str, paths: dict[str, str], out: str, max_rank: int) -> str:
    """Builds a merge in a new interpreter (as a restarted worker would); returns the weights' sha256."""
    import hashlib
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        pool.apply(_build_from_json, (spec_json, paths, out, max_rank))
    return hashlib.sha256((Path(out) / WEIGHTS_FILE).read_bytes()).hexdigest()


def _build_from_json(spec_json: str, paths: dict[str, str], out: str, max_rank: int) -> None:
    import json

    spec = json.loads(spec_json)
    merge = MergeSpec.of(
        [tuple(s) for s in spec["sources"]],
        spec["method"],
        spec["density"],
        spec["majority_sign_method"] or "total",
    )
    build_merge(merge.with_paths({sha: Path(p) for sha, p in paths.items()}), Path(out), max_rank)


def gate_builds(monkeypatch) -> tuple[threading.Event, list[str]]:
    """Builds wait for the returned event before running; the list records each build as it starts."""
    gate, started = threading.Event(), []
    real = store_module.build_merge

    def gated(spec, out, max_rank, base):
        started.append(spec.key(max_rank))
        assert gate.wait(120)
        return real(spec, out, max_rank, base)

    monkeypatch.setattr(store_module, "build_merge", gated)
    return gate, started


async def until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.01)
