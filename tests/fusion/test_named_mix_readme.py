"""The README's quick start through our engine (greedy) on the demo model: the saved mix `openlora up`
creates gives its documented output on the merge a worker builds from the demo adapters, and so does the
documented ensemble."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from data_plane.engine.request import AdapterRef, Ensemble, EnsembleMember
from data_plane.fusion.builder import build_merge
from data_plane.fusion.spec import MergeSpec
from openlora.artifact import digest_dir
from openlora.commands.demo_setup import DEMO_MIXES
from openlora.v1 import inference_pb2
from tests.demo_support import PROMPT, greedy_texts

README = Path(__file__).resolve().parents[2] / "README.md"
# The worker's default max_lora_rank (up passes none): part of a merge's key.
WORKER_MAX_RANK = 64


def _documented(command: str) -> str:
    """The output the README's quick start shows for `openlora <command> "the quick fox =>"`."""
    return _documented_line(re.escape(command)).group(1)


def _documented_line(command_pattern: str) -> re.Match:
    line = re.search(rf'openlora {command_pattern} "{PROMPT}"\s+# "([^"]*)"', README.read_text())
    assert line is not None, f"the README's quick start lacks `openlora {command_pattern}`"
    return line


def _greedy_text(model_dir: Path, ref: AdapterRef | None = None, ensemble: Ensemble | None = None) -> str:
    request = ensemble if ensemble is not None else (ref,) if ref is not None else ()
    return greedy_texts(model_dir, [request])[0]


def _merge_ref(model_dir: Path, fields: dict, out_root: Path) -> AdapterRef:
    """The derived adapter a worker builds for the saved mix (same spec, same key)."""
    method = inference_pb2.MixMethod.Name(fields["method"]).removeprefix("MIX_METHOD_").lower()
    paths = {
        digest_dir(model_dir / "adapters" / name): model_dir / "adapters" / name
        for name, _ in fields["members"]
    }
    by_name = {path.name: sha for sha, path in paths.items()}
    spec = MergeSpec.of(
        [(by_name[name], weight) for name, weight in fields["members"]], method, fields.get("density", 1.0)
    ).with_paths(paths)
    key = spec.key(WORKER_MAX_RANK)
    build_merge(spec, out_root / key, WORKER_MAX_RANK)
    return AdapterRef(key=key, path=out_root / key)


# Writing the demo model trains it for seconds; more on a loaded machine.
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", sorted(DEMO_MIXES))
def test_each_demo_saved_mix_gives_its_documented_output(demo_model_dir, tmp_path, name):
    documented = _documented(f"generate --adapter {name}")
    assert _greedy_text(demo_model_dir, _merge_ref(demo_model_dir, DEMO_MIXES[name], tmp_path)) == documented


@pytest.mark.timeout(900)
def test_the_documented_ensemble_gives_its_documented_output(demo_model_dir):
    line = _documented_line(r"generate --mix (\S+) --mix-method ensemble")
    members = []
    for part in line.group(1).split(","):
        name, weight = part.split("=")
        path = demo_model_dir / "adapters" / name
        members.append(EnsembleMember(AdapterRef(key=digest_dir(path), path=path), float(weight)))
    ensemble = Ensemble(tuple(members))
    documented = line.group(2)
    assert _greedy_text(demo_model_dir, ensemble=ensemble) == documented
