"""The plain-read safetensors reader: the tensors safetensors itself reads, and a clean ShardError for
every malformed header or data section."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from data_plane.model.shard_reader import ShardError, iter_tensors


def _raw(path, header: object, data: bytes = b"") -> None:
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def test_tensors_read_back_as_safetensors_reads_them(tmp_path):
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.randn(2, 2, 2).half(),
        "empty": torch.zeros(0, 4),
    }
    save_file(tensors, tmp_path / "x.safetensors")
    got = dict(iter_tensors(tmp_path / "x.safetensors"))
    want = load_file(tmp_path / "x.safetensors")
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        (b"{", b"", "not valid JSON"),
        (b"[" * 10_000 + b"]" * 10_000, b"", "nested deeper"),
        ([1, 2], b"", "must be a JSON object"),
        (
            {"t": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}},
            b"\0" * 8,
            r"is not served \(F32, F16 or BF16 only\)",
        ),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "do not match"),
        ({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "do not match"),
        ({"t": {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}}, b"\0" * 16, "malformed"),
        ({"t": [1]}, b"", "malformed header entry"),
    ],
)
def test_a_malformed_shard_is_refused_cleanly(tmp_path, header, data, message):
    path = tmp_path / "bad.safetensors"
    _raw(path, header, data)
    with pytest.raises(ShardError, match=message):
        list(iter_tensors(path))


def test_a_header_length_past_the_file_is_refused(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(ShardError, match="larger than the file"):
        list(iter_tensors(path))
    path.write_bytes(b"\1\2")
    with pytest.raises(ShardError, match="truncated"):
        list(iter_tensors(path))
