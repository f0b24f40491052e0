"""read_peft_adapter: validate a PEFT LoRA directory, then load its factors as tensors.

A worker reads the same artifact again each time it comes back from disk (evicted from host memory, then
called again). Its validation (headers, shapes, every value scanned for NaN and infinity) took about
three quarters of such a read, so a directory whose files are unchanged since a validation that passed is
not validated again: `_validated` keeps the outcome by the files' identity (device, inode, size, modification
and change times of each file, and the directory's listing), which any rewrite, replacement or added file
changes. A refusal is never kept: a directory that failed is checked again in full on its next read.

What is left of such a read, the tensors, is one read of the file's data section into the host buffer
where the file stores its factors in the dtype the host copy keeps (`read_packed_adapter`): a tensor
object and a copy per factor made it five times longer than that one read.
"""

from __future__ import annotations

import os
import struct
import threading
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from data_plane.adapters.host_buffer import HostAdapter, PackedFactors, pack
from data_plane.adapters.weights import AdapterWeights, LoraFactors
from data_plane.engine.errors import AdapterLoadError
from data_plane.model.shard_reader import TORCH_DTYPES
from openlora.adapter_format import AdapterFormatError, AdapterInfo, TensorInfo, validate_adapter_dir
from openlora.artifact import CONFIG_FILE, WEIGHTS_FILE
from openlora.base_model import BaseModelSpec
from openlora.exhaustion import exhausted_resource

# Safetensors dtypes whose every value a float32 engine holds exactly.
_EXACT_IN_FLOAT32 = {"F16": torch.float16, "BF16": torch.bfloat16}


def open_weights(path: Path):
    """`safe_open` of an adapter's weights file. safetensors reports a process out of file descriptors as
    FileNotFoundError ("No such file or directory"): an adapter refused, and its sound copy dropped, for
    what was overload. A failed open is tried once more with os.open, and an exhausted resource it meets
    is raised as what it is (UNAVAILABLE, retry)."""
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as error:
        try:
            os.close(os.open(path, os.O_RDONLY))
        except OSError as cause:
            if exhausted_resource(cause):
                raise cause from error
        raise


def host_dtype(file_dtype: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype an adapter's host copy keeps for an engine computing in `dtype`: the file's own where it
    is narrower and converts to `dtype` exactly (F16 or BF16 factors under a float32 engine: half the host
    memory, widened by the copy into a slot, bit for bit what reading them as `dtype` gives), else `dtype`.
    `file_dtype` is a safetensors dtype name, or "mixed" for a file of several."""
    if dtype == torch.float32:
        return _EXACT_IN_FLOAT32.get(file_dtype, dtype)
    return dtype


# Directories validated (most recent last), by `_identity`. An entry holds the adapter's tensor list
# (about 470 bytes a tensor: 40 KiB for a 6-layer adapter on all seven projections, 210 KiB for 32 layers),
# so the memo is bounded by tensors as well as entries: about 30 MiB at most, the most recent adapters.
_VALIDATED_MAX = 4096
_VALIDATED_MAX_TENSORS = 65536
_validated: OrderedDict[tuple, AdapterInfo] = OrderedDict()
_validated_tensors = 0  # tensors of the entries kept
_validated_lock = threading.Lock()


def _identity(path: Path) -> tuple | None:
    """What changes whenever a directory's adapter could: its listing and each file's stat fields (None
    when it cannot be read: validation then reports why)."""
    try:
        listing = tuple(sorted(os.listdir(path)))
        stats = []
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            st = os.lstat(path / name)
            stats.append((st.st_dev, st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    except OSError:
        return None
    return (str(path.resolve()), listing, tuple(stats))


def validated_info(path: Path, spec: BaseModelSpec, max_rank: int) -> AdapterInfo:
    """`validate_adapter_dir(path, spec, max_rank=max_rank)`, skipped when these files passed it before."""
    identity = _identity(Path(path))
    key = None if identity is None else (identity, spec, max_rank)
    if key is not None:
        with _validated_lock:
            info = _validated.get(key)
            if info is not None:
                _validated.move_to_end(key)
                return info
    info = validate_adapter_dir(path, spec, max_rank=max_rank)
    if key is not None and _identity(Path(path)) == identity:  # unchanged while it was checked
        _remember(key, info)
    return info


def forget_validations() -> None:
    """Empties the memo (the next read of every directory is validated in full)."""
    global _validated_tensors
    with _validated_lock:
        _validated.clear()
        _validated_tensors = 0


def _remember(key: tuple, info: AdapterInfo) -> None:
    global _validated_tensors
    with _validated_lock:
        if key in _validated:
            return
        _validated[key] = info
        _validated_tensors += len(info.tensors)
        while _validated and (
            len(_validated) > _VALIDATED_MAX or _validated_tensors > _VALIDATED_MAX_TENSORS
        ):
            _, oldest = _validated.popitem(last=False)
            _validated_tensors -= len(oldest.tensors)


def _validated_or_refused(path: Path, spec: BaseModelSpec, max_rank: int) -> AdapterInfo:
    try:
        return validated_info(Path(path), spec, max_rank)
    except AdapterFormatError as e:
        raise AdapterLoadError(f"adapter.{e.field}", e.reason) from None
    except OSError as e:
        if exhausted_resource(e):  # the worker is overloaded (out of files, memory): not the adapter's fault
            raise
        raise AdapterLoadError("adapter", f"cannot read {Path(path).name!r}: {e.strerror}") from None


def _stat_key(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _file_stat(path: Path) -> tuple | None:
    try:
        return _stat_key(os.stat(path))
    except OSError:
        return None


def read_packed_adapter(
    path: Path, spec: BaseModelSpec, max_rank: int, dtype: torch.dtype, pin_memory: bool = False
) -> HostAdapter:
    """`pack(read_peft_adapter(..., keep_exact_dtype=True))`, the host copy of one adapter, read the short
    way where the file allows: when every factor is stored in the dtype the host copy keeps (an F16 or BF16
    file under a float32 engine, a file in the engine's own dtype), the file's data section is read into
    the host buffer in one read and the factors are views at their offsets, bit for bit what the tensor by
    tensor read and pack give, without a tensor object and a copy per factor. Otherwise (a conversion, a
    factor not aligned to its element size, or a file that is not the one validated), that read and pack.
    """
    weights_path = Path(path) / WEIGHTS_FILE
    seen = _file_stat(weights_path)  # before the validation: the file read must be this very one
    info = _validated_or_refused(path, spec, max_rank)
    host = _read_in_one(weights_path, info, seen, host_dtype(info.dtype, dtype), pin_memory)
    if host is None:
        host = pack(read_peft_adapter(path, spec, max_rank, dtype, keep_exact_dtype=True), pin_memory)
    return host


def _read_in_one(
    weights_path: Path, info: AdapterInfo, seen: tuple | None, dtype: torch.dtype, pin_memory: bool
) -> HostAdapter | None:
    """The host copy in `dtype` of the validated file `weights_path` (`info`), its data section read in one
    read; None where that does not apply (factors stored in another dtype or unaligned, or the file not
    the one stat'ed as `seen` before the validation, or not ending where the validated offsets say)."""
    element = torch.empty((), dtype=dtype).element_size()
    if (
        TORCH_DTYPES.get(info.dtype) != dtype
        or not info.tensors
        or any(t.dtype != info.dtype or t.begin % element for t in info.tensors)
    ):
        return None
    size = max(t.end for t in info.tensors)
    try:
        with open(weights_path, "rb") as f:
            prefix = f.read(8)
            header_len = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
            opened = os.fstat(f.fileno())
            if seen is None or _stat_key(opened) != seen or opened.st_size != 8 + header_len + size:
                return None  # replaced or rewritten since: the by-name read validates and reads it
            data = torch.empty(size, dtype=torch.uint8, pin_memory=pin_memory)
            f.seek(8 + header_len)
            got = f.readinto(memoryview(data.numpy()))
    except OSError as e:
        if exhausted_resource(e):
            raise
        raise AdapterLoadError(f"adapter.{WEIGHTS_FILE}", f"cannot be read: {str(e)[:200]}") from None
    if got != size:  # it shrank while it was read
        raise AdapterLoadError(f"adapter.{WEIGHTS_FILE}", f"cannot be read: {got} of {size} data bytes")
    pairs: dict[tuple[int, str], dict[str, TensorInfo]] = {}
    for t in info.tensors:
        pairs.setdefault((t.layer, t.module), {})[t.which] = t
    layout = [
        PackedFactors(
            layer,
            module,
            ab["A"].begin // element,
            tuple(ab["A"].shape),
            ab["B"].begin // element,
            tuple(ab["B"].shape),
            info.scaling_of(layer, module),
        )
        for (layer, module), ab in sorted(pairs.items())
    ]
    return HostAdapter(data.view(dtype), info.rank, tuple(layout))


def read_peft_adapter(
    path: Path, spec: BaseModelSpec, max_rank: int, dtype: torch.dtype, *, keep_exact_dtype: bool = False
) -> AdapterWeights:
    """Validates `path` against the base model, then reads every lora_A/lora_B into `dtype` CPU tensors
    (with `keep_exact_dtype`: into `host_dtype(file's dtype, dtype)`, for a copy that is only ever widened
    into `dtype`).

    Raises AdapterLoadError(field, reason) for anything refused (missing, malformed, another base model).
    """
    info = _validated_or_refused(path, spec, max_rank)
    if keep_exact_dtype:
        dtype = host_dtype(info.dtype, dtype)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with open_weights(Path(path) / WEIGHTS_FILE) as f:
            for t in info.tensors:
                pairs.setdefault((t.layer, t.module), {})[t.which] = f.get_tensor(t.name).to(dtype)
    except (SafetensorError, OSError) as e:
        if exhausted_resource(e):
            raise
        # The validator and safetensors disagree on the file, or it changed under us: still a refusal.
        raise AdapterLoadError(f"adapter.{WEIGHTS_FILE}", f"cannot be read: {str(e)[:200]}") from None
    factors = {key: LoraFactors(ab["A"], ab["B"], info.scaling_of(*key)) for key, ab in pairs.items()}
    return AdapterWeights(rank=info.rank, factors=factors)
