"""An adapter read from disk into host memory the short way (its file's data section in one read, the
factors views at their offsets) is bit for bit the host copy the tensor by tensor read and pack make, is
taken only where the file's dtype is the host copy's, and refuses a file that no longer holds what its
validation saw."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from data_plane.adapters import peft_reader
from data_plane.adapters.host_buffer import pack, unpack
from data_plane.adapters.peft_reader import read_packed_adapter, read_peft_adapter
from data_plane.engine.errors import AdapterLoadError
from openlora.artifact import WEIGHTS_FILE
from tests.engine.conftest import make_engine


@pytest.fixture(scope="module")
def spec(tiny_model):
    engine = make_engine(tiny_model)
    try:
        return engine.spec
    finally:
        engine.shutdown()


def _rewritten(source: Path, target: Path, dtypes) -> Path:
    """`source` with tensor i stored in dtypes[i % len(dtypes)]."""
    shutil.copytree(source, target)
    tensors = load_file(source / WEIGHTS_FILE)
    save_file(
        {n: tensors[n].to(dtypes[i % len(dtypes)]).contiguous() for i, n in enumerate(sorted(tensors))},
        target / WEIGHTS_FILE,
    )
    return target


@pytest.fixture(scope="module")
def files(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    dirs = dict(tiny_model.adapter_dirs)  # float32 files, ranks 4 to 64, several target sets
    dirs["r8_all_f16"] = _rewritten(dirs["r8_all"], root / "f16", [torch.float16])
    dirs["r16_bf16"] = _rewritten(dirs["r16_rslora"], root / "bf16", [torch.bfloat16])
    dirs["r8_mixed"] = _rewritten(dirs["r8_all"], root / "mixed", [torch.float16, torch.float32])
    return dirs


def _same(host, expected) -> None:
    assert host.buffer.dtype == expected.buffer.dtype
    assert host.rank == expected.rank
    got, want = unpack(host), unpack(expected)
    assert got.factors.keys() == want.factors.keys()
    for key, factors in want.factors.items():
        assert torch.equal(got.factors[key].a, factors.a), key
        assert torch.equal(got.factors[key].b, factors.b), key
        assert got.factors[key].scale == factors.scale, key
    assert host.size_bytes == expected.size_bytes


# (adapter, engine dtype, whether the file's dtype is the host copy's: the one-read path)
CASES = [
    ("r4_qv", torch.float32, True),
    ("r8_all", torch.float32, True),
    ("r16_rslora", torch.float32, True),
    ("r64_all", torch.float32, True),
    ("r8_all_f16", torch.float32, True),
    ("r16_bf16", torch.float32, True),
    ("r8_all_f16", torch.bfloat16, False),  # converted at the read
    ("r8_all", torch.bfloat16, False),
    ("r8_mixed", torch.float32, False),
]


@pytest.mark.parametrize(("name", "dtype", "one_read"), CASES)
def test_the_host_copy_is_the_one_read_and_pack_make(files, spec, monkeypatch, name, dtype, one_read):
    path = files[name]
    expected = pack(read_peft_adapter(path, spec, 64, dtype, keep_exact_dtype=True), pin_memory=False)
    packed_by_tensor = []

    def counting_pack(weights, pin_memory):
        packed_by_tensor.append(weights)
        return pack(weights, pin_memory)

    monkeypatch.setattr(peft_reader, "pack", counting_pack)
    host = read_packed_adapter(path, spec, 64, dtype)
    _same(host, expected)
    assert (not packed_by_tensor) == one_read


def test_a_file_shorter_than_its_validated_header_says_is_refused_naming_the_file(
    files, spec, tmp_path, monkeypatch
):
    """The file changes between its validation and the read (here: the validation's outcome is that of
    the intact copy, the file read a truncated one): the read is refused, not served short."""
    intact = files["r8_all"]
    info = peft_reader.validated_info(intact, spec, 64)
    cut = tmp_path / "cut"
    shutil.copytree(intact, cut)
    data = (cut / WEIGHTS_FILE).read_bytes()
    (cut / WEIGHTS_FILE).write_bytes(data[: len(data) - 100])
    monkeypatch.setattr(peft_reader, "validated_info", lambda path, spec, max_rank: info)
    with pytest.raises(AdapterLoadError) as refused:
        read_packed_adapter(cut, spec, 64, torch.float32)
    assert refused.value.field == f"adapter.{WEIGHTS_FILE}"
