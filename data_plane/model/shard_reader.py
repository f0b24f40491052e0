"""Reading a safetensors shard one tensor at a time with plain file reads.

`safe_open` maps the whole shard into memory, and every page it touches stays in the process's resident
set until the shard is closed, so loading a shard of S bytes costs S of RSS however the tensors are used.
Reading each tensor into its own buffer keeps the peak at the largest tensor, which is what lets the
loader quantize a model that would not fit in memory in full precision. Each buffer is an anonymous
mapping of its own rather than malloc'd memory: glibc keeps freed heap blocks resident, and reads of
16 MiB tensors interleaved with the quantized weights kept growing RSS by the size of what was read
(measured: +48 MiB per layer of a 64 MiB layer quantized to 16 MiB), while a mapping is returned to the
system as soon as the tensor is dropped.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from openlora.safe_json import JsonFieldError, load_json_object

MAX_HEADER_BYTES = 100 << 20  # the safetensors format's own limit
_HEADER_DEPTH = 3  # {name: {"shape": [...]}}
TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class ShardError(ValueError):
    """A shard whose header or data is malformed (the message names the tensor or field)."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte offsets within the data section
    end: int


def read_entries(path: Path) -> tuple[list[TensorEntry], int]:
    """(tensor entries in file order, offset of the data section) of a shard; checks every entry."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ShardError("truncated: no header length")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise ShardError(
                f"header length {header_len} is larger than the file or {MAX_HEADER_BYTES} bytes"
            )
        raw = f.read(header_len)
    try:
        header = load_json_object(raw, "header", max_depth=_HEADER_DEPTH)
    except JsonFieldError as e:
        raise ShardError(str(e)) from None
    data_bytes = size - 8 - header_len
    entries = []
    for name, entry in header.data.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise ShardError(f"tensor {name!r}: malformed header entry")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in TORCH_DTYPES:
            raise ShardError(
                f"tensor {name!r}: dtype {str(dtype)[:16]!r} is not served (F32, F16 or BF16 only)"
            )
        if (
            not isinstance(shape, list)
            or not all(type(d) is int and d >= 0 for d in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
        ):
            raise ShardError(f"tensor {name!r}: malformed shape or data_offsets")
        begin, end = offsets
        numel = 1
        for d in shape:
            numel *= d
        if not 0 <= begin <= end <= data_bytes or end - begin != numel * TORCH_DTYPES[dtype].itemsize:
            raise ShardError(f"tensor {name!r}: data_offsets do not match its shape or the file size")
        entries.append(TensorEntry(name, TORCH_DTYPES[dtype], tuple(shape), begin, end))
    entries.sort(key=lambda e: e.begin)
    return entries, 8 + header_len


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for each tensor of the shard in file order, each read into a fresh CPU tensor."""
    entries, data_offset = read_entries(path)
    with open(path, "rb", buffering=0) as f:
        for entry in entries:
            num_bytes = entry.end - entry.begin
            if num_bytes == 0:
                yield entry.name, torch.empty(entry.shape, dtype=entry.dtype)
                continue
            region = mmap.mmap(-1, num_bytes)
            f.seek(data_offset + entry.begin)
            with memoryview(region) as view:
                done = 0
                while done < num_bytes:
                    count = f.readinto(view[done:])
                    if not count:
                        raise ShardError(f"tensor {entry.name!r}: file ends early")
                    done += count
            buffer = torch.frombuffer(region, dtype=torch.uint8)  # keeps `region` alive, no copy
            yield entry.name, buffer.view(entry.dtype).view(entry.shape)
