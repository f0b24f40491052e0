"""An adapter read from disk into host memory the short way (its file's data section in one read, the
factors views at their offsets) is bit for bit the host copy the tensor by tensor read and pack make, is
taken only where the file's dtype is the host copy's, and refuses a file that no longer holds what its
validation saw."""

from __future__ import annotations

import json
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


def _reordered(data: bytes) -> bytes:
    """The same tensors, stored in the reverse order of their names (a valid file, other offsets)."""
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    names = sorted((n for n in header if n != "__metadata__"), reverse=True)
    body, offset, new_header = b"", 0, {k: v for k, v in header.items() if k == "__metadata__"}
    for name in names:
        begin, end = header[name]["data_offsets"]
        chunk = data[8 + header_len + begin : 8 + header_len + end]
        new_header[name] = {**header[name], "data_offsets": [offset, offset + len(chunk)]}
        body, offset = body + chunk, offset + len(chunk)
    raw = json.dumps(new_header).encode()
    return len(raw).to_bytes(8, "little") + raw + body


@pytest.mark.parametrize(
    "rewrite",
    [
        pytest.param(lambda data: data + b"\0" * 64, id="bytes-appended"),
        pytest.param(lambda data: (1 << 63).to_bytes(8, "little") + data[8:], id="header-length-huge"),
        pytest.param(_reordered, id="tensors-reordered"),
    ],
)
def test_a_file_rewritten_after_its_validation_is_read_as_the_by_name_read_reads_it(
    files, spec, tmp_path, monkeypatch, rewrite
):
    """The validation's offsets are used only for the file it saw: one rewritten between the validation
    and the read is refused, or read by tensor name, exactly as the tensor by tensor read does."""
    directory = tmp_path / "rewritten"
    shutil.copytree(files["r8_all"], directory)
    weights = directory / WEIGHTS_FILE
    validate = peft_reader.validated_info

    def validate_then_rewrite(path, spec, max_rank):
        info = validate(path, spec, max_rank)
        weights.write_bytes(rewrite(weights.read_bytes()))
        return info

    monkeypatch.setattr(peft_reader, "validated_info", validate_then_rewrite)
    try:
        host = read_packed_adapter(directory, spec, 64, torch.float32)
    except AdapterLoadError as refused:
        monkeypatch.undo()
        with pytest.raises(AdapterLoadError) as by_tensor:
            read_peft_adapter(directory, spec, 64, torch.float32, keep_exact_dtype=True)
        assert refused.field == by_tensor.value.field
        return
    monkeypatch.undo()
    _same(host, pack(read_peft_adapter(directory, spec, 64, torch.float32, keep_exact_dtype=True), False))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("name", "dtype", "one_read"), CASES)
def test_on_cuda_the_pinned_host_copy_is_the_one_read_and_pack_make(files, spec, name, dtype, one_read):
    """The worker on CUDA keeps its host copies pinned: the one read fills a pinned buffer (run by
    benchmarks/gpu_check.sh)."""
    path = files[name]
    expected = pack(read_peft_adapter(path, spec, 64, dtype, keep_exact_dtype=True), pin_memory=False)
    host = read_packed_adapter(path, spec, 64, dtype, pin_memory=True)
    assert host.buffer.is_pinned()
    _same(host, expected)
