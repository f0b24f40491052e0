"""Every bad upload is refused with INVALID_ARGUMENT (or FAILED_PRECONDITION for an unknown base model)
naming the problem, and leaves nothing behind: no row, no artifact, no temporary file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import grpc
import psycopg
import pytest
import torch
from safetensors.torch import load_file, save_file

from openlora.admin_client import UploadRefused, adapter_files

from .uploads import dir_files, raw_upload

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def _edit_weights(directory: Path, edit) -> Path:
    tensors = load_file(directory / WEIGHTS)
    edit(tensors)
    save_file(tensors, directory / WEIGHTS)
    return directory


def _edit_config(directory: Path, **changes) -> Path:
    config = json.loads((directory / CONFIG).read_text())
    config.update(changes)
    (directory / CONFIG).write_text(json.dumps(config))
    return directory


def _first_key(tensors: dict, which: str = "lora_A") -> str:
    return sorted(k for k in tensors if which in k and "q_proj" in k)[0]


def _set_nan(tensors: dict) -> None:
    key = _first_key(tensors)
    tensors[key][0, 0] = math.nan


def _wrong_shape(tensors: dict) -> None:
    key = _first_key(tensors)
    tensors[key] = torch.randn(tensors[key].shape[0], 32)


def _to_f64(tensors: dict) -> None:
    for key in tensors:
        tensors[key] = tensors[key].to(torch.float64)


def _leftovers(cp, name: str) -> tuple[int, list[str], list[str]]:
    with psycopg.connect(cp.config.database_url) as conn:
        (rows,) = conn.execute("SELECT count(*) FROM adapter WHERE name = %s", (name,)).fetchone()
    artifacts = cp.config.state_dir / "artifacts"
    return (
        rows,
        sorted(p.name for p in artifacts.iterdir() if p.name != ".tmp"),
        sorted(p.name for p in (artifacts / ".tmp").iterdir()),
    )


def _refused(cp, files, expected_code, expected_text, name="refused", **kwargs) -> None:
    before = _leftovers(cp, name)
    with pytest.raises(grpc.RpcError) as e:
        raw_upload(cp, files, name=name, **kwargs)
    assert e.value.code() == expected_code, e.value.details()
    assert expected_text in e.value.details()
    assert _leftovers(cp, name) == before == (0, before[1], [])


@pytest.mark.parametrize("name", [".", "..", "-rf", "a b", "a/b", "x" * 129, ""])
def test_names_no_url_or_command_line_can_carry_are_refused(cp, adapter_copy, name) -> None:
    """ "." and ".." are folded away by every URL library (`/v1/models/..` cannot be asked for); a leading
    "-" reads as an option on every command line."""
    _refused(cp, dir_files(adapter_copy("a")), grpc.StatusCode.INVALID_ARGUMENT, "name:", name=name)


def test_names_with_dots_inside_are_names(cp, adapter_copy) -> None:
    files = dir_files(adapter_copy("a"))
    for name in ("...", ".hidden", "v1.2", "a-"):
        assert raw_upload(cp, files, name=name).adapter.name == name


def test_pickle_file_is_refused_by_name(cp, adapter_copy) -> None:
    files = dir_files(adapter_copy("a"))
    files[1] = ("adapter_model.bin", b"\x80\x04not opened")
    _refused(cp, files, grpc.StatusCode.INVALID_ARGUMENT, "filename")


def test_path_in_filename_is_refused(cp, adapter_copy) -> None:
    original = dir_files(adapter_copy("a"))
    for bad in (
        "../adapter_config.json",
        "sub/adapter_model.safetensors",
        "..\\adapter_config.json",
        "d/" * 10_000,  # echoed whole, it reached the client as RESOURCE_EXHAUSTED (header limit)
    ):
        files = [(bad, original[0][1]), original[1]]
        _refused(cp, files, grpc.StatusCode.INVALID_ARGUMENT, "filename")


def test_truncated_upload_is_refused(cp, adapter_copy) -> None:
    files = dir_files(adapter_copy("a"))
    full = len(files[1][1])
    files[1] = (WEIGHTS, files[1][1][: full - 100])
    _refused(cp, files, grpc.StatusCode.INVALID_ARGUMENT, "truncated", declared_sizes={WEIGHTS: full})


def test_file_longer_than_declared_is_refused(cp, adapter_copy) -> None:
    files = dir_files(adapter_copy("a"))
    _refused(cp, files, grpc.StatusCode.INVALID_ARGUMENT, "longer", declared_sizes={WEIGHTS: 10})


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (_wrong_shape, "do not fit the base model"),
        (_set_nan, "NaN"),
        (_to_f64, "dtype"),
    ],
    ids=["mismatched-shape", "nan-values", "wrong-dtype"],
)
def test_invalid_weights_are_refused(cp, adapter_copy, edit, expected) -> None:
    directory = _edit_weights(adapter_copy("a"), edit)
    _refused(cp, dir_files(directory), grpc.StatusCode.INVALID_ARGUMENT, expected)


def test_rank_over_the_limit_is_refused(cp, adapter_copy) -> None:
    directory = _edit_config(adapter_copy("a"), r=cp.config.max_lora_rank + 1)
    _refused(cp, dir_files(directory), grpc.StatusCode.INVALID_ARGUMENT, "adapter_config.json.r")


def _padded_to_rank(directory: Path, rank: int) -> Path:
    """The same adapter at a higher rank (zero rows of A, zero columns of B: the same product)."""

    def pad(tensors: dict) -> None:
        for key, t in tensors.items():
            if "lora_A" in key:
                tensors[key] = torch.cat([t, t.new_zeros(rank - t.shape[0], t.shape[1])])
            elif "lora_B" in key:
                tensors[key] = torch.cat([t, t.new_zeros(t.shape[0], rank - t.shape[1])], dim=1)

    return _edit_config(_edit_weights(directory, pad), r=rank)


def test_the_rank_limit_is_the_largest_a_worker_of_the_base_model_accepts(
    cp, adapter_copy, base_spec
) -> None:
    """Workers choose --max-lora-rank; uploads were refused past 64 whatever the workers accepted."""
    from .conftest import register_worker

    rank_96 = dir_files(_padded_to_rank(adapter_copy("a"), 96))
    rank_129 = dir_files(_padded_to_rank(adapter_copy("b"), 129))
    _refused(cp, rank_96, grpc.StatusCode.INVALID_ARGUMENT, "exceeds the maximum of 64", name="r96")
    register_worker(cp, base_spec, worker_id="wide-worker", max_lora_rank=128)
    try:
        raw_upload(cp, rank_96, name="r96")
        _refused(cp, rank_129, grpc.StatusCode.INVALID_ARGUMENT, "exceeds the maximum of 128", name="r129")
        # A worker that stopped heartbeating no longer counts (worker rows outlive their workers).
        with psycopg.connect(cp.config.database_url) as conn:
            conn.execute(
                "UPDATE worker SET last_heartbeat_at = now() - interval '1 day' WHERE id = 'wide-worker'"
            )
        _refused(cp, rank_96, grpc.StatusCode.INVALID_ARGUMENT, "exceeds the maximum of 64", name="r96-later")
    finally:  # the module's other tests expect the fixture worker's 64
        register_worker(cp, base_spec, worker_id="wide-worker", max_lora_rank=64)


def test_auto_map_in_config_is_refused(cp, adapter_copy) -> None:
    directory = _edit_config(adapter_copy("a"), auto_map={"AutoModel": "evil.Model"})
    _refused(cp, dir_files(directory), grpc.StatusCode.INVALID_ARGUMENT, "auto_map")


def test_adapter_for_more_layers_than_the_base_model_is_refused(cp, adapter_copy) -> None:
    _refused(cp, dir_files(adapter_copy("deep")), grpc.StatusCode.INVALID_ARGUMENT, "layers")


def test_unknown_base_model_is_refused(cp, adapter_copy) -> None:
    files = dir_files(adapter_copy("a"))
    _refused(cp, files, grpc.StatusCode.FAILED_PRECONDITION, "base_model", base_model="no-such-model")


def test_missing_header_and_missing_file_are_refused(cp, adapter_copy) -> None:
    files = dir_files(adapter_copy("a"))
    _refused(cp, files, grpc.StatusCode.INVALID_ARGUMENT, "header: the first message", with_header=False)
    _refused(cp, files[:1], grpc.StatusCode.INVALID_ARGUMENT, "files: must list adapter_config.json and")


def test_client_refuses_pickle_files_and_skips_readme(adapter_copy) -> None:
    directory = adapter_copy("a")
    (directory / "README.md").write_text("card")
    assert [p.name for p in adapter_files(directory)] == [CONFIG, WEIGHTS]
    (directory / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(UploadRefused, match="pickle"):
        adapter_files(directory)
