"""The CPU kernels of `int4_cpu.c`, `int8_cpu.c`, `openlora_kernels/sgmv_cpu.c` and
`openlora_kernels/attention_cpu.c`, compiled for this machine at first use into one library and loaded
through ctypes.

    kernels = native_kernels()                          # NativeKernels, or None (why: native_kernels_problem())
    weight = kernels.int4_weight(codes, scale, offset, G)  # checked once for the C code
    y = kernels.int4_mm(x, weight)                         # x (T, K) float32 -> y (T, N) float32
    y = kernels.int8_mm(x, kernels.int8_weight(qweight, scale))  # the same for int8.py's layout
    u = kernels.sgmv_shrink(x, lora_a, segments)              # a step's LoRA (data_plane/model/native_lora.py)
    kernels.sgmv_expand(u, lora_b, scale, segments, y)
    tables = kernels.decode_tables(block_tables, context_lens)  # a step's decode rows, checked once
    out = kernels.paged_decode(q, k_cache, v_cache, tables, scale)  # their attention, in place in the caches
    kernels.kv_slots(slot_ids).rope_kv_write(q, k, v, (cos, sin), k_cache, v_cache)  # rotary, KV writes

The library is built with the machine's C compiler (`CC`, else `cc` or `gcc`) and `-march=native`, and
cached under `$XDG_CACHE_HOME/openlora/kernels` (else `~/.cache/...`; a private temporary directory,
removed once loaded, when that cannot be written or another user could have written what is in it) by a
digest of the sources, the command (CC's arguments too), the compiler's version and the CPU's model and
flags, so a cache shared with another machine or an upgraded compiler builds again. A build is written
beside its final name and renamed into it: workers starting together never load half a file.
Before use it is checked on small weights against the torch dequantizations; a machine without a compiler,
a failed build or a failed check leaves `native_kernels()` None, and int4 and int8 on the CPU then take
PyTorch's kernels (int4.py and int8.py say what that costs), the LoRA of a step the torch reference's.

OpenMP in the library resolves to the runtime torch has already loaded (its `libgomp.so.1`), so the
kernel's threads are torch's own pool; each call passes `torch.get_num_threads()`.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import operator
import os
import platform
import secrets
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = (
    Path(__file__).with_name("int4_cpu.c"),
    Path(__file__).with_name("int8_cpu.c"),
    Path(__file__).parents[3] / "openlora_kernels" / "sgmv_cpu.c",
    Path(__file__).parents[3] / "openlora_kernels" / "attention_cpu.c",
)
HEADERS = (Path(__file__).with_name("quant_cpu.h"),)  # included by both: in the digest, not on the command
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=gnu11")
# A build takes about a second; a compiler still running after this is killed with everything it started
# (cc1, as, ld), and the kernels are not used by this process.
_BUILD_TIMEOUT_S = 60
_VERSION_TIMEOUT_S = 10
_problem: str | None = None  # why native_kernels() is None


@dataclass(frozen=True)
class NativeKernels:
    """The loaded library. `vector_bits`: 512 (AVX-512), 256 (AVX2) or 0 (plain C) in this build."""

    library: ctypes.CDLL
    path: Path
    vector_bits: int
    cached: bool = False  # found in the cache rather than built by this process

    def int4_weight(
        self, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int
    ) -> Int4Weight:
        """An int4 weight checked once for the C code (which trusts its pointers): codes (N, K / 2) uint8,
        scale and offset (N, K / group_size) bfloat16, all contiguous on the CPU, in int4_cpu.c's layout."""
        n, k = _check_weight(codes, scale, offset, group_size)
        return Int4Weight(codes, scale, offset, group_size, n, k)

    def int4_mm(self, x: torch.Tensor, weight: Int4Weight) -> torch.Tensor:
        """x (T, K) float32 contiguous -> x @ W.T (T, N) float32."""
        _check_x(x, weight.in_features)
        num_tokens, n = x.shape[0], weight.out_features
        y = torch.empty(num_tokens, n, dtype=torch.float32, device="cpu")
        self.library.openlora_int4_mm(
            x.data_ptr(), num_tokens, weight.in_features, weight.codes.data_ptr(), weight.scale.data_ptr(),
            weight.offset.data_ptr(), n, weight.group_size, y.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return y

    def int4_dequantize(
        self, weight: Int4Weight, start: int = 0, end: int | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rows start:end of W, (end - start, K) float32: exactly the values `int4_mm` multiplies by; written
        into `out` when given (a contiguous float32 tensor of that shape, reused across calls)."""
        n, k = weight.out_features, weight.in_features
        end = n if end is None else end
        if not 0 <= start <= end <= n:
            raise ValueError(f"rows {start}:{end} outside 0:{n}")
        if out is None:
            out = torch.empty(end - start, k, dtype=torch.float32, device="cpu")
        elif (
            out.dtype != torch.float32
            or not out.is_contiguous()
            or tuple(out.shape) != (end - start, k)
            or out.device.type != "cpu"
        ):
            raise ValueError(f"out must be contiguous float32 ({end - start}, {k}) on the CPU")
        self.library.openlora_int4_dequantize(
            weight.codes.data_ptr(), weight.scale.data_ptr(), weight.offset.data_ptr(), k, weight.group_size,
            start, end - start, out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return out

    def int8_weight(self, qweight: torch.Tensor, scale: torch.Tensor) -> Int8Weight:
        """An int8 weight checked once for the C code: qweight (N, K_pad) int8 (int8.py's layout, input
        padded), scale (N,) bfloat16, contiguous on the CPU."""
        _check_int8_weight(qweight, scale)
        return Int8Weight(qweight, scale, qweight.shape[0], qweight.shape[1])

    def int8_mm(self, x: torch.Tensor, weight: Int8Weight) -> torch.Tensor:
        """x (T, K) float32 contiguous, K padding to K_pad -> x @ (qweight[:, :K] * scale[:, None]).T, (T, N)
        float32."""
        _check_x(x, k_pad=weight.padded_in_features)
        num_tokens, k = x.shape
        n = weight.out_features
        y = torch.empty(num_tokens, n, dtype=torch.float32, device="cpu")
        self.library.openlora_int8_mm(
            x.data_ptr(), num_tokens, k, weight.qweight.data_ptr(), weight.padded_in_features,
            weight.scale.data_ptr(), n, y.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return y

    def sgmv_shrink(
        self, x: torch.Tensor, lora_a: torch.Tensor, segments: NativeSegments, rank_columns: int = 1
    ) -> torch.Tensor:
        """u (T, C) float32 = x (T, K) @ lora_a[slot] (C, K).T over each segment's rows, its first
        min(C, rank * rank_columns) columns (the rest zero, as are rows outside every segment)."""
        _check_rows("x", x, segments.num_rows)
        _check_pool("lora_a", lora_a, segments, last_contiguous=True)
        if lora_a.shape[2] != x.shape[1]:
            raise ValueError(f"lora_a holds {lora_a.shape[2]} input features, x {x.shape[1]}")
        num_cols = lora_a.shape[1]
        u = torch.zeros(x.shape[0], num_cols, dtype=torch.float32, device="cpu")
        self.library.openlora_sgmv_shrink(
            x.data_ptr(), x.stride(0), x.shape[1], lora_a.data_ptr(), lora_a.stride(0), lora_a.stride(1),
            *segments.pointers(), rank_columns, u.data_ptr(), u.stride(0), num_cols, torch.get_num_threads(),
        )  # fmt: skip
        return u

    def sgmv_expand(
        self,
        u: torch.Tensor,
        lora_b: torch.Tensor,
        scale: torch.Tensor,
        segments: NativeSegments,
        y: torch.Tensor,
    ) -> None:
        """y (T, O) += scale[slot] * u (T, >= C) @ lora_b[slot] (O, C).T over each segment's rows and its
        first min(C, rank) columns, in place. u's columns may be strided (a slice of a fused group's
        rank-interleaved u); lora_b may hold either dimension contiguous."""
        _check_rows("y", y, segments.num_rows, last_contiguous=True)
        if u.dim() != 2 or u.dtype != torch.float32 or u.device.type != "cpu" or u.shape[0] != y.shape[0]:
            raise ValueError(f"u must be float32 ({y.shape[0]}, C) on the CPU, got {u.dtype} {list(u.shape)}")
        _check_b_pool("lora_b", lora_b, segments)
        if lora_b.shape[1] != y.shape[1] or lora_b.shape[2] > u.shape[1] or lora_b.shape[2] > SGMV_MAX_COLS:
            raise ValueError(
                f"lora_b {list(lora_b.shape)} does not fit u {list(u.shape)} and y {list(y.shape)} "
                f"(at most {SGMV_MAX_COLS} columns)"
            )
        _check_scale("scale", scale, (lora_b.shape[0],))
        self.library.openlora_sgmv_expand(
            u.data_ptr(), u.stride(0), u.stride(1), lora_b.data_ptr(), lora_b.stride(0), lora_b.stride(1),
            lora_b.stride(2), lora_b.shape[1], scale.data_ptr(), *segments.pointers(), lora_b.shape[2],
            y.data_ptr(), y.stride(0), torch.get_num_threads(),
        )  # fmt: skip

    def sgmv_lora(
        self,
        x: torch.Tensor,
        lora_a: torch.Tensor,
        lora_b: list[torch.Tensor],
        lora_scale: torch.Tensor,
        segments: NativeSegments,
        y: torch.Tensor,
        slices: list[int] | range,
        slice_bounds: list[tuple[int, int]],
    ) -> None:
        """`sgmv_shrink` then `sgmv_expand` of each of ``slices`` in one call: y (T, O) columns
        ``slice_bounds[i]`` += scale[i, slot] * (x @ lora_a[slot, i::n].T) @ lora_b[i][slot].T over each
        segment's rows and its rank's columns. lora_a (S, R * n, K) rank-interleaved over the n slices,
        lora_b[i] (S, O_i, R) either dimension contiguous, lora_scale (n, S) float32. With many segments a
        work item takes a whole segment (`openlora_sgmv_lora` in sgmv_cpu.c): its u never leaves the
        stack, and a step's projection is one call instead of one per slice. The same as
        `sgmv_lora_pools(x, lora_pools(...), segments, y)`, the pools checked on every call."""
        pools = self.lora_pools(lora_a, lora_b, lora_scale, slices, slice_bounds, y.shape[1])
        self.sgmv_lora_pools(x, pools, segments, y)

    def lora_pools(
        self,
        lora_a: torch.Tensor,
        lora_b: list[torch.Tensor],
        lora_scale: torch.Tensor,
        slices: list[int] | range,
        slice_bounds: list[tuple[int, int]],
        out_features: int,
    ) -> LoraPools:
        """A projection's pools and slices (as `sgmv_lora` takes them, y having ``out_features`` columns)
        checked once for the C code: a layer keeps the handle while its pools stay the same tensors."""
        _check_pool("lora_a", lora_a, None, last_contiguous=True)
        n, (num_slots, num_cols, k_len) = len(lora_b), lora_a.shape
        if num_cols > SGMV_MAX_COLS or num_cols % max(n, 1):
            raise ValueError(
                f"lora_a {list(lora_a.shape)} does not fit {n} slices (at most {SGMV_MAX_COLS} columns)"
            )
        _check_scale("lora_scale", lora_scale, (n, num_slots))
        table = []
        for i in slices:
            if not 0 <= i < n or not 0 <= i < len(slice_bounds):
                raise ValueError(f"slice {i} of {n}")
            b, (start, end) = lora_b[i], slice_bounds[i]
            _check_b_pool(f"lora_b[{i}]", b, None)
            if b.shape[0] != num_slots or b.shape[2] * n > num_cols or not 0 <= start <= end <= out_features:
                raise ValueError(f"lora_b[{i}] {list(b.shape)} does not fit lora_a {list(lora_a.shape)}")
            if b.shape[1] != end - start:
                raise ValueError(f"lora_b[{i}] has {b.shape[1]} outputs, its columns of y {end - start}")
            table.append(
                (i, b.data_ptr(), *b.stride(), b.shape[2], end - start, start, lora_scale[i].data_ptr())
            )
        # (9, slices) int64, a row a field: ids, b addresses, b strides (3), b columns, outputs, y's first
        # column, scale addresses.
        fields = torch.tensor(table, dtype=torch.int64, device="cpu").reshape(-1, 9).T.contiguous()
        row = fields.stride(0) * fields.element_size()
        args = (
            lora_a.data_ptr(), lora_a.stride(0), lora_a.stride(1), num_cols, n, len(table),
            *(fields.data_ptr() + j * row for j in range(9)),
        )  # fmt: skip
        return LoraPools(
            lora_a, tuple(lora_b), lora_scale, tuple(slices), out_features, k_len, num_slots, fields, args
        )

    def sgmv_lora_pools(
        self, x: torch.Tensor, pools: LoraPools, segments: NativeSegments, y: torch.Tensor
    ) -> None:
        """`sgmv_lora` on pools checked once (`lora_pools`): x (T, K) and y (T, O) rows contiguous."""
        # Every projection of every step comes here: one condition of the cheapest accessors (dtypes are
        # singletons, is_cpu makes no device object), the messages only on a refusal.
        rows = segments.num_rows
        if not (
            x.dtype is torch.float32
            and y.dtype is torch.float32
            and x.is_cpu
            and y.is_cpu
            and x.shape == (rows, pools.in_features)
            and y.shape == (rows, pools.out_features)
            and x.stride(1) == 1
            and y.stride(1) == 1
        ):
            _check_rows("x", x, rows)
            _check_rows("y", y, rows)
            raise ValueError(
                f"x {list(x.shape)} and y {list(y.shape)} do not fit pools of {pools.in_features} inputs and "
                f"{pools.out_features} outputs"
            )
        if segments.num_slots > pools.num_slots:
            raise ValueError(
                f"lora_a holds {pools.lora_a.shape[0]} slots, the segments use up to {segments.num_slots}"
            )
        if not pools.slices or not segments.count:
            return
        if self.library.openlora_sgmv_lora(
            x.data_ptr(), x.stride(0), pools.in_features, *pools.args, *segments.pointers(), rows,
            y.data_ptr(), y.stride(0), torch.get_num_threads(),
        ):  # fmt: skip
            raise MemoryError(f"the SGMV kernels' u of {rows} x {pools.args[3]} floats")

    def decode_tables(self, block_tables: torch.Tensor, context_lens: torch.Tensor) -> NativeDecodeTables:
        """A step's decode block tables (D, max_blocks) and context lengths (D,), int64 on the CPU,
        checked once for every layer's `paged_decode`."""
        return NativeDecodeTables(self, block_tables, context_lens)

    def paged_decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        tables: NativeDecodeTables,
        scale: float,
        window: int | None = None,
    ) -> torch.Tensor:
        """out (D, heads, head_dim) float32: each decode row's query attending to its first
        context_lens[d] cached positions (with a window, the last `window` of them), read in place through
        its block table (`openlora_paged_decode` in attention_cpu.c); the semantics of
        `openlora_kernels.paged_attention.paged_decode_attention`. q (D, heads, head_dim) with its last dimension
        contiguous; k_cache, v_cache (num_blocks, block_size, kv_heads, head_dim) contiguous float32."""
        problem = decode_shape_problem(q, k_cache, v_cache)
        if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
            problem = f"window must be a whole number of positions of at least 1, got {window!r}"
        if problem is None:
            problem = tables.problem(q.shape[0], k_cache.shape[0], k_cache.shape[1])
        if problem is not None:
            raise ValueError(problem)
        num_seqs, heads, head_dim = q.shape
        kv_heads = k_cache.shape[2]
        out = torch.empty(q.shape, dtype=torch.float32, device="cpu")
        self.library.openlora_paged_decode(
            q.data_ptr(), q.stride(0), q.stride(1), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[1],
            kv_heads, head_dim, tables.block_tables.data_ptr(), tables.block_tables.stride(0),
            tables.context_lens.data_ptr(), num_seqs, heads // kv_heads, scale, window or 0, out.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
        return out

    def kv_slots(self, slot_ids: torch.Tensor) -> NativeKvSlots:
        """A step's KV slot ids (T,), int64 on the CPU (block * block_size + offset of each row), checked once
        for every layer's `NativeKvSlots.rope_kv_write`."""
        return NativeKvSlots(self, slot_ids)


# attention_cpu.c's bounds: query heads per kv head, floats per head, positions per cache block.
ATTENTION_MAX_GROUP = 16
ATTENTION_MAX_HEAD_DIM = 256
ATTENTION_MAX_BLOCK = 64


def attention_shape_problem(heads: int, kv_heads: int, head_dim: int, block_size: int) -> str | None:
    """Why attention_cpu.c cannot take a model of these attention shapes (None when it can): the model's
    decode attention takes the torch path then."""
    if kv_heads <= 0 or heads % kv_heads:
        return f"{heads} query heads do not share {kv_heads} kv heads evenly"
    if heads // kv_heads > ATTENTION_MAX_GROUP or head_dim > ATTENTION_MAX_HEAD_DIM:
        return (
            f"{heads // kv_heads} query heads per kv head of {head_dim} (at most {ATTENTION_MAX_GROUP} of "
            f"{ATTENTION_MAX_HEAD_DIM})"
        )
    if not 0 < block_size <= ATTENTION_MAX_BLOCK:
        return f"blocks of {block_size} positions (at most {ATTENTION_MAX_BLOCK})"
    return None


def decode_shape_problem(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> str | None:
    """Why `paged_decode` cannot take these tensors (a dtype, layout or size outside attention_cpu.c's),
    None when it can."""
    if q.dtype != torch.float32 or q.device.type != "cpu":
        return "q must be float32 on the CPU"
    if q.dim() != 3 or q.stride(2) != 1:
        return f"q must be (D, heads, head_dim) with its last dimension contiguous, got {list(q.shape)}"
    problem = _caches_problem(k_cache, v_cache)
    if problem is not None:
        return problem
    _, block_size, kv_heads, head_dim = k_cache.shape
    if q.shape[2] != head_dim:
        return f"q {list(q.shape)} does not fit caches {list(k_cache.shape)}"
    return attention_shape_problem(q.shape[1], kv_heads, head_dim, block_size)


def _caches_problem(k_cache: torch.Tensor, v_cache: torch.Tensor) -> str | None:
    """Why k_cache and v_cache are not the pair attention_cpu.c reads (contiguous float32 CPU tensors of one
    (num_blocks, block_size, kv_heads, head_dim) shape); None when they are."""
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if (
            cache.dtype != torch.float32
            or cache.device.type != "cpu"
            or cache.dim() != 4
            or not cache.is_contiguous()
        ):
            return (
                f"{name} must be a contiguous float32 (num_blocks, block_size, kv_heads, head_dim) CPU tensor"
            )
    if v_cache.shape != k_cache.shape:
        return f"v_cache {list(v_cache.shape)} is not k_cache's shape {list(k_cache.shape)}"
    return None


class NativeDecodeTables:
    """A step's decode rows for `paged_decode`, checked once for the C code (which trusts its indices):
    block_tables (D, max_blocks) and context_lens (D,), int64 on the CPU, rows contiguous; each call then
    checks only that its cache holds the largest block id and that its block size covers the longest
    context within the table's columns."""

    def __init__(self, kernel: NativeKernels, block_tables: torch.Tensor, context_lens: torch.Tensor) -> None:
        self.kernel = kernel
        for name, t, dims in (("block_tables", block_tables, 2), ("context_lens", context_lens, 1)):
            if t.dtype != torch.int64 or t.device.type != "cpu" or t.dim() != dims or t.stride(-1) != 1:
                raise ValueError(f"{name} must be {dims}-D int64 on the CPU, last dimension contiguous")
        if context_lens.shape[0] != block_tables.shape[0]:
            raise ValueError(f"{block_tables.shape[0]} block tables, {context_lens.shape[0]} context lengths")
        self.block_tables, self.context_lens = block_tables, context_lens
        empty = block_tables.numel() == 0
        self.min_block = 0 if empty else int(block_tables.min())
        self.max_block = -1 if empty else int(block_tables.max())
        self.min_context = 0 if context_lens.numel() == 0 else int(context_lens.min())
        self.max_context = 0 if context_lens.numel() == 0 else int(context_lens.max())
        if self.min_block < 0 or self.min_context < 0:
            raise ValueError("block ids and context lengths must not be negative")

    def attend(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float, window: int | None
    ) -> torch.Tensor:
        """`NativeKernels.paged_decode` of these rows."""
        return self.kernel.paged_decode(q, k_cache, v_cache, self, scale, window)

    def problem(self, num_seqs: int, num_blocks: int, block_size: int) -> str | None:
        """Why these tables do not fit a (num_seqs, ...) query and a cache of num_blocks blocks of
        block_size positions; None when they do."""
        if num_seqs != self.block_tables.shape[0]:
            return f"q has {num_seqs} rows, the tables {self.block_tables.shape[0]}"
        if self.max_block >= num_blocks:
            return f"block id {self.max_block} outside a cache of {num_blocks} blocks"
        if self.max_context > self.block_tables.shape[1] * block_size:
            return (
                f"context of {self.max_context} positions past {self.block_tables.shape[1]} blocks of "
                f"{block_size}"
            )
        return None


class NativeKvSlots:
    """A step's KV slot ids for `rope_kv_write`, checked once for the C code (which writes where they say):
    (T,) int64 on the CPU, contiguous, none negative; each call then checks only that its cache holds the
    largest."""

    def __init__(self, kernel: NativeKernels, slot_ids: torch.Tensor) -> None:
        if slot_ids.dtype != torch.int64 or slot_ids.device.type != "cpu" or slot_ids.dim() != 1:
            raise ValueError("slot_ids must be 1-D int64 on the CPU")
        if not slot_ids.is_contiguous():
            raise ValueError("slot_ids must be contiguous")
        self.kernel, self.slot_ids, self.count = kernel, slot_ids, slot_ids.shape[0]
        self.max_slot = int(slot_ids.max()) if self.count else -1
        if self.count and int(slot_ids.min()) < 0:
            raise ValueError("slot ids must not be negative")

    def rope_kv_write(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> None:
        """q (T, heads, head_dim) and k (T, kv_heads, head_dim) rotated in place by the rows' (cos, sin)
        tables (T, 1, head_dim), then each row's k and v written into the caches (num_blocks, block_size,
        kv_heads, head_dim) at its slot of these ids (`openlora_rope_kv_write` in attention_cpu.c): the floats of
        `apply_rotary` and two `index_copy_`s, in one call. q, k and v float32 with their last dimension
        contiguous (views of a fused projection's output are fine); cos, sin and the caches contiguous."""
        num_rows = self.count
        cos, sin = rope
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dtype != torch.float32 or t.device.type != "cpu" or t.dim() != 3 or t.stride(2) != 1:
                raise ValueError(
                    f"{name} must be float32 (T, heads, head_dim) on the CPU, last dimension contiguous"
                )
            if t.shape[0] != num_rows:
                raise ValueError(f"{name} has {t.shape[0]} rows, the slots {num_rows}")
        head_dim, kv_heads = q.shape[2], k.shape[1]
        if k.shape[2] != head_dim or v.shape != k.shape or head_dim % 2:
            raise ValueError(
                f"q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}: no even head_dim shared"
            )
        for name, t in (("cos", cos), ("sin", sin)):
            if (
                t.dtype != torch.float32
                or t.device.type != "cpu"
                or not t.is_contiguous()
                or t.numel() != num_rows * head_dim
            ):
                raise ValueError(f"{name} must be contiguous float32 ({num_rows}, 1, {head_dim})")
        problem = _caches_problem(k_cache, v_cache)
        if problem is None and tuple(k_cache.shape[2:]) != (kv_heads, head_dim):
            problem = f"k_cache must hold ({kv_heads}, {head_dim}) per position, got {list(k_cache.shape)}"
        if problem is not None:
            raise ValueError(problem)
        if self.max_slot >= k_cache.shape[0] * k_cache.shape[1]:
            raise ValueError(
                f"slot {self.max_slot} outside a cache of {k_cache.shape[0] * k_cache.shape[1]} positions"
            )
        if not num_rows:
            return
        self.kernel.library.openlora_rope_kv_write(
            q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), k.stride(0), k.stride(1), v.data_ptr(),
            v.stride(0), v.stride(1), cos.data_ptr(), sin.data_ptr(), num_rows, q.shape[1], kv_heads, head_dim,
            self.slot_ids.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip


# The widest lora_b (columns: rank) `sgmv_expand` takes: MAX_COLS of sgmv_cpu.c.
SGMV_MAX_COLS = 512
# The element types a slot of the float32 pools may hold its factors in, by their codes in sgmv_cpu.c:
# float16 and bfloat16 values are float32 values exactly, so an adapter whose file holds them is kept in
# them (half the bytes a step reads) and widened by the kernels as they load it. `packed_view` gives the
# 16-bit view of a pool.
SLOT_FORMATS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def packed_view(pool: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float32 pool (S, N, C) as `dtype` (float16 or bfloat16) slots, as the kernels read them: slot s
    begins where it begins in `pool`, and its elements lie at `pool`'s strides within it, so a slot of the
    view fills the first half of its float32 slot and no other. Shares the pool's memory."""
    if pool.dtype != torch.float32 or dtype not in (torch.float16, torch.bfloat16) or pool.dim() != 3:
        raise ValueError(f"a 16-bit view of a {pool.dtype} pool {list(pool.shape)} as {dtype}")
    s0, s1, s2 = pool.stride()
    return torch.empty(0, dtype=dtype, device=pool.device).set_(
        pool.untyped_storage(), 2 * pool.storage_offset(), pool.shape, (2 * s0, s1, s2)
    )


@dataclass(frozen=True, eq=False)
class LoraPools:
    """A projection's LoRA pools checked once for `openlora_sgmv_lora` (`NativeKernels.lora_pools`); per call
    only x, y and the step's segments are checked. The tensors are held, so their memory outlives the handle."""

    lora_a: torch.Tensor
    lora_b: tuple[torch.Tensor, ...]
    lora_scale: torch.Tensor
    slices: tuple[int, ...]
    out_features: int
    in_features: int
    num_slots: int
    fields: torch.Tensor  # (9, slices) int64, the C code's per-slice arrays
    args: tuple[int, ...]  # a's address and strides, columns, slices, the fields' addresses

    def holds(
        self,
        lora_a: torch.Tensor,
        lora_b: list[torch.Tensor],
        lora_scale: torch.Tensor,
        slices: tuple[int, ...],
    ) -> bool:
        """Whether this handle is of these very tensors and slices (a layer whose pools were replaced, or a
        step that leaves other slices out, needs another)."""
        if not (
            self.lora_a is lora_a
            and self.lora_scale is lora_scale
            and self.slices == slices
            and len(self.lora_b) == len(lora_b)
        ):
            return False
        return all(map(operator.is_, self.lora_b, lora_b))


class NativeSegments:
    """A step's segments for the SGMV kernels, checked once for the C code (which trusts its indices):
    (start, end, slot, rank) of each, rows within ``num_rows``, slots below ``num_slots``, and each one's
    slot format (`SLOT_FORMATS`: the element type its slot holds its factors in; float32 where not given).

    Built once per step and passed to every projection's shrink and expand."""

    def __init__(
        self,
        segments: list[tuple[int, int, int, int]],
        num_rows: int,
        num_slots: int,
        formats: Sequence[int] = (),
    ) -> None:
        for start, end, slot, rank in segments:
            if not (0 <= start < end <= num_rows and 0 <= slot < num_slots and rank >= 0):
                raise ValueError(
                    f"segment {(start, end, slot, rank)} outside {num_rows} rows, {num_slots} slots"
                )
        formats = list(formats) if formats else [SLOT_FORMATS[torch.float32]] * len(segments)
        if len(formats) != len(segments) or not set(formats) <= set(SLOT_FORMATS.values()):
            raise ValueError(f"segment formats {formats} for {len(segments)} segments")
        columns = [*zip(*segments, strict=True), formats] if segments else [(), (), (), (), ()]
        # (5, G) int64: starts, ends, slots, ranks, formats; contiguous rows the C code reads.
        self.table = torch.tensor(columns, dtype=torch.int64, device="cpu").reshape(5, len(segments))
        self.num_rows = num_rows
        self.num_slots = num_slots
        self.count = len(segments)
        base, row = self.table.data_ptr(), self.table.stride(0) * self.table.element_size()
        self._pointers = (*(base + j * row for j in range(5)), self.count)

    def pointers(self) -> tuple[int, ...]:
        """starts, ends, slots, ranks, formats (addresses) and the count, in the C functions' order."""
        return self._pointers


def _check_rows(name: str, t: torch.Tensor, num_rows: int, last_contiguous: bool = True) -> None:
    # Run on every projection of every step: the cheapest accessors first (dtypes are singletons; is_cpu
    # makes no device object).
    if (
        t.dtype is not torch.float32
        or not t.is_cpu
        or t.dim() != 2
        or t.shape[0] != num_rows
        or (last_contiguous and t.stride(1) != 1)
    ):
        raise ValueError(
            f"{name} must be float32 ({num_rows}, N) on the CPU, rows contiguous; got {t.dtype} "
            f"{list(t.shape)} strides {t.stride()}"
        )


def _check_b_pool(name: str, pool: torch.Tensor, segments: NativeSegments | None) -> None:
    """A B pool (S, O, R) with either its outputs (the CPU pools' layout) or its ranks contiguous."""
    _check_pool(name, pool, segments, last_contiguous=not (pool.dim() == 3 and pool.stride(1) == 1))


def _check_scale(name: str, scale: torch.Tensor, shape: tuple[int, ...]) -> None:
    if scale.dtype != torch.float32 or not scale.is_contiguous() or tuple(scale.shape) != shape:
        raise ValueError(f"{name} must be contiguous float32 {shape}")


def _check_pool(
    name: str, pool: torch.Tensor, segments: NativeSegments | None, last_contiguous: bool
) -> None:
    """A pool's layout; with `segments`, that it holds every slot they use."""
    contiguous = pool.dim() == 3 and (pool.stride(2) == 1 if last_contiguous else pool.stride(1) == 1)
    if pool.dtype != torch.float32 or pool.device.type != "cpu" or not contiguous:
        raise ValueError(f"{name} must be a float32 (S, N, C) CPU pool with one dimension contiguous")
    if segments is not None and segments.num_slots > pool.shape[0]:
        raise ValueError(f"{name} holds {pool.shape[0]} slots, the segments use up to {segments.num_slots}")


@dataclass(frozen=True)
class Int4Weight:
    """An int4 weight whose tensors passed the checks the C code relies on (`NativeKernels.int4_weight`):
    the kernels check only x per call."""

    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    group_size: int
    out_features: int
    in_features: int

    def holds(self, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> bool:
        """Whether this handle is of these very tensors (a layer whose buffers were replaced needs a new one)."""
        return self.codes is codes and self.scale is scale and self.offset is offset


@dataclass(frozen=True)
class Int8Weight:
    """An int8 weight whose tensors passed the checks the C code relies on (`NativeKernels.int8_weight`)."""

    qweight: torch.Tensor
    scale: torch.Tensor
    out_features: int
    padded_in_features: int

    def holds(self, qweight: torch.Tensor, scale: torch.Tensor) -> bool:
        return self.qweight is qweight and self.scale is scale


# int8.py pads the input dimension of its codes to a multiple of this; x keeps the real width.
INT8_IN_MULTIPLE = 16


def _check_x(x: torch.Tensor, k: int | None = None, k_pad: int | None = None) -> None:
    """x must be (T, k) float32 on the CPU, contiguous; with `k_pad` instead, (T, K) for a K that pads to
    it."""
    width = x.shape[1] if x.dim() == 2 else -1
    ok_width = width == k if k_pad is None else k_pad - INT8_IN_MULTIPLE < width <= k_pad
    if x.device.type != "cpu" or x.dtype != torch.float32 or not x.is_contiguous() or not ok_width:
        want = f"(T, {k})" if k_pad is None else f"(T, K) with K padding to {k_pad}"
        raise ValueError(f"x must be contiguous float32 {want} on the CPU, got {x.dtype} {list(x.shape)}")


def _check_int8_weight(qweight: torch.Tensor, scale: torch.Tensor) -> None:
    """The C code trusts its pointers: every shape, dtype and layout of the weight it assumes is checked
    here first."""
    if (
        qweight.dim() != 2
        or qweight.dtype != torch.int8
        or not qweight.is_contiguous()
        or qweight.device.type != "cpu"
    ):
        raise ValueError("qweight must be a contiguous int8 (N, K_pad) CPU tensor")
    n = qweight.shape[0]
    if (
        scale.dtype != torch.bfloat16
        or not scale.is_contiguous()
        or tuple(scale.shape) != (n,)
        or scale.device.type != "cpu"
    ):
        raise ValueError(f"scale must be contiguous bfloat16 ({n},) on the CPU")


def _check_weight(
    codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int
) -> tuple[int, int]:
    """The C code trusts its pointers: every shape, dtype and layout of the weight it assumes is checked
    here first. Returns (N, K)."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be (N, K / 2), got {list(codes.shape)}")
    n, k = codes.shape[0], 2 * codes.shape[1]
    for t in (codes, scale, offset):
        if t.device.type != "cpu":
            raise ValueError(f"the int4 CPU kernel takes CPU tensors, got one on {t.device}")
    if codes.dtype != torch.uint8 or not codes.is_contiguous():
        raise ValueError("codes must be contiguous uint8")
    if group_size not in (32, 64, 128) or k % group_size:
        raise ValueError(f"group size {group_size} does not divide in_features {k}")
    for name, t in (("scale", scale), ("offset", offset)):
        if t.dtype != torch.bfloat16 or not t.is_contiguous() or tuple(t.shape) != (n, k // group_size):
            raise ValueError(f"{name} must be contiguous bfloat16 ({n}, {k // group_size})")
    return n, k


def native_kernels() -> NativeKernels | None:
    """The kernel library for this machine, built and checked once per process; None where it cannot be."""
    return _load()


def native_kernels_problem() -> str | None:
    """Why `native_kernels()` is None (None when it is not)."""
    _load()
    return _problem


@functools.cache
def _load() -> NativeKernels | None:
    global _problem
    try:
        try:
            kernel = _build_and_load()
            _check_against_torch(kernel)
        except _CachedFileBad as bad:  # damaged on disk since it was built: built again, once
            log.warning("CPU kernels: %s; building them again", bad)
            bad.path.unlink(missing_ok=True)
            kernel = _build_and_load()
            _check_against_torch(kernel)
    except (_Unavailable, OSError) as reason:  # OSError: no cache and no temporary directory to build in
        _problem = str(reason)
        log.warning(
            "CPU kernels unavailable (%s): int4 and int8 on the CPU take PyTorch's kernels (int4: activations "
            "and outputs of its linears rounded to bfloat16; int8.py says which), LoRA the torch reference",
            _problem,
        )
        return None
    log.info(
        "CPU kernels (int4, int8, SGMV in float32): %s (%s)",
        kernel.path.name,
        _vector_name(kernel.vector_bits),
    )
    return kernel


class _Unavailable(Exception):
    """Why the library cannot serve here (no compiler, a failed build, a failed check)."""


class _CachedFileBad(_Unavailable):
    """A library found in the cache (not built by this process) failed to load or to pass the check."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


def _compiler() -> list[str]:
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    for name in ("cc", "gcc"):
        if path := shutil.which(name):
            return [path]
    raise _Unavailable("no C compiler: install gcc, or name one in CC")


def _machine_identity() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    identity = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part"):
                    identity.append(line.strip())
                if line.strip() == "":  # the first processor is enough
                    break
    except OSError:
        pass
    return "\n".join(identity)


def _cache_dir() -> Path | None:
    """The cache directory, None where it cannot be written or trusted."""
    xdg_cache_home = os.environ.get("XDG_CACHE_HOME", "")
    try:
        # A relative XDG_CACHE_HOME is ignored, as the XDG spec asks (it names a cache per working directory).
        base = Path(xdg_cache_home) if os.path.isabs(xdg_cache_home) else Path.home() / ".cache"
    except RuntimeError:  # no home directory: HOME unset and this uid without a passwd entry
        return None
    base = base / "openlora" / "kernels"
    try:
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        base = base.resolve()  # used by its real path: a link swapped after the check changes nothing
        if untrusted := _untrusted(base):
            log.warning(
                "CPU kernels: not using the cache %s (%s); building into a private directory",
                base,
                untrusted,
            )
        elif os.access(base, os.W_OK | os.X_OK):
            return base
    except OSError:
        pass
    return None


def _untrusted(directory: Path) -> str | None:
    """Why a library found in `directory` may be another user's code (None when it cannot be): the process
    runs what it loads from there. The directory must be this user's and writable by no one else, and each
    directory above it this user's or root's and not world-writable unless sticky (as the system's temporary
    directory is)."""
    uid = os.geteuid()
    st = directory.stat()
    if st.st_uid != uid:
        return f"it belongs to uid {st.st_uid}"
    if st.st_mode & 0o022:
        return f"others can write to it (mode {stat.S_IMODE(st.st_mode):o}; chmod go-w makes it usable)"
    for parent in directory.parents:
        st = parent.stat()
        if st.st_uid not in (uid, 0):
            return f"{parent} belongs to uid {st.st_uid}"
        if st.st_mode & 0o002 and not st.st_mode & stat.S_ISVTX:
            return f"anyone can write to {parent}"
    return None


def _build_and_load() -> NativeKernels:
    compiler = _compiler()
    try:
        version = _run([*compiler, "--version"], _VERSION_TIMEOUT_S)
        if version.returncode != 0:
            raise subprocess.CalledProcessError(version.returncode, [*compiler, "--version"])
        version = version.stdout
    except (OSError, subprocess.SubprocessError) as error:
        raise _Unavailable(f"the C compiler {shlex.join(compiler)} does not run ({error})") from None
    sources = [source.read_bytes() for source in (*SOURCES, *HEADERS)]
    digest = hashlib.sha256(
        b"\0".join(
            [
                *sources,
                shlex.join([*compiler, *FLAGS]).encode(),
                version.encode(),
                _machine_identity().encode(),
            ]
        )
    ).hexdigest()[:16]
    name = f"openlora_cpu-{digest}.so"
    if (directory := _cache_dir()) is not None:
        return _load_library(compiler, directory / name)
    # Private (0700), this process only, and removed once loaded: the library stays mapped without its file.
    with tempfile.TemporaryDirectory(prefix="openlora-kernels-", ignore_cleanup_errors=True) as private:
        return _load_library(compiler, Path(private) / name)


def _load_library(compiler: list[str], path: Path) -> NativeKernels:
    """The library at `path`, built there first unless an intact one is there already."""
    if path.exists() and not _intact(path):  # dlopen of a cut file is a SIGBUS, not an error: checked first
        log.warning("CPU kernels: the cached %s is damaged; building it again", path.name)
        path.unlink(missing_ok=True)
    cached = path.exists()
    if not cached:
        _build(compiler, path)
    try:
        library = ctypes.CDLL(str(path))
    except OSError as error:
        if cached:
            raise _CachedFileBad(f"loading the cached {path.name} failed ({error})", path) from None
        raise _Unavailable(f"loading {path.name} failed ({error})") from None
    try:
        return _bind(library, path, cached)
    except AttributeError as error:  # a library of other sources: an older build, or not ours
        message = f"{path.name} lacks a kernel ({error})"
        raise _CachedFileBad(message, path) if cached else _Unavailable(message) from None


def _bind(library: ctypes.CDLL, path: Path, cached: bool) -> NativeKernels:
    """The library's functions with their C signatures (AttributeError for one it lacks)."""
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    library.openlora_int4_mm.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, i64, ptr, ctypes.c_int]
    library.openlora_int4_mm.restype = None
    library.openlora_int4_dequantize.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, ptr, ctypes.c_int]
    library.openlora_int4_dequantize.restype = None
    library.openlora_int8_mm.argtypes = [ptr, i64, i64, ptr, i64, ptr, i64, ptr, ctypes.c_int]
    library.openlora_int8_mm.restype = None
    library.openlora_sgmv_shrink.argtypes = [
        ptr, i64, i64, ptr, i64, i64, ptr, ptr, ptr, ptr, ptr, i64, i64, ptr, i64, i64, ctypes.c_int
    ]  # fmt: skip
    library.openlora_sgmv_shrink.restype = None
    library.openlora_sgmv_expand.argtypes = [
        ptr, i64, i64, ptr, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, ptr, i64, ctypes.c_int
    ]  # fmt: skip
    library.openlora_sgmv_expand.restype = None
    library.openlora_sgmv_lora.argtypes = [
        ptr, i64, i64, ptr, i64, i64, i64, i64, i64, *[ptr] * 9, ptr, ptr, ptr, ptr, ptr, i64, i64, ptr, i64,
        ctypes.c_int,
    ]  # fmt: skip
    library.openlora_sgmv_lora.restype = ctypes.c_int
    library.openlora_paged_decode.argtypes = [
        ptr, i64, i64, ptr, ptr, i64, i64, i64, ptr, i64, ptr, i64, i64, ctypes.c_float, i64, ptr, ctypes.c_int
    ]  # fmt: skip
    library.openlora_paged_decode.restype = None
    library.openlora_rope_kv_write.argtypes = [
        ptr, i64, i64, ptr, i64, i64, ptr, i64, i64, ptr, ptr, i64, i64, i64, i64, ptr, ptr, ptr, ctypes.c_int
    ]  # fmt: skip
    library.openlora_rope_kv_write.restype = None
    library.openlora_int4_vector_bits.argtypes = []
    library.openlora_int4_vector_bits.restype = ctypes.c_int
    return NativeKernels(library, path, library.openlora_int4_vector_bits(), cached)


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _intact(path: Path) -> bool:
    """The library's bytes are those its build recorded beside it."""
    try:
        return _digest_path(path).read_text().strip() == hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return False


def _run(command: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    """Runs `command` in a session of its own; past `timeout_s` the whole session is killed (the driver
    and what it started: killing the driver alone left cc1 and ld running) and TimeoutExpired raised.
    Interrupted (Ctrl-C reaches this process, not the command's session), the session is killed too.
    Output this process cannot decode (a compiler's messages in a legacy locale) is read with U+FFFD."""
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        start_new_session=True,
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout_s)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            # The driver is reaped and its pipes closed (on leaving the `with`), not read to their end: a
            # process it started that left the session may hold them open for as long as it runs.
            process.wait()
            raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _build(compiler: list[str], path: Path) -> None:
    """Compiles SOURCES into `path`, its digest recorded first: every name it appears under is whole."""
    # Unique past the pid: workers in other pid namespaces sharing the cache (containers) reuse pids.
    partial = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(8)}.partial")
    _remove_abandoned_partials(path.parent)
    try:
        built = _run([*compiler, *FLAGS, *map(str, SOURCES), "-o", str(partial)], _BUILD_TIMEOUT_S)
        if built.returncode != 0:
            last = (built.stderr.strip().splitlines() or ["no message"])[-1]
            raise _Unavailable(f"{shlex.join(compiler)} failed to build the CPU kernels: {last}")
        digest_partial = partial.with_name(partial.name + ".sha256")
        digest_partial.write_text(hashlib.sha256(partial.read_bytes()).hexdigest() + "\n")
        os.replace(digest_partial, _digest_path(path))
        os.replace(partial, path)
    except (OSError, subprocess.SubprocessError) as error:
        raise _Unavailable(f"building the CPU kernels failed ({error})") from None
    finally:
        partial.unlink(missing_ok=True)
        partial.with_name(partial.name + ".sha256").unlink(missing_ok=True)


def _remove_abandoned_partials(directory: Path) -> None:
    """Removes the partial files of builds that cannot still be running: a worker killed while it compiled
    (`up` stopped during a first start) leaves its own behind, since nothing of it runs to remove it. A
    build older than twice the timeout has been killed or has ended."""
    cutoff = time.time() - 2 * _BUILD_TIMEOUT_S
    for leftover in directory.glob(".*.partial*"):
        with contextlib.suppress(OSError):
            if leftover.stat().st_mtime < cutoff:
                leftover.unlink()


def _check_against_torch(kernel: NativeKernels) -> None:
    """Small products through the library against the same weights dequantized by torch."""
    from data_plane.model.quant.int4 import dequantize_int4, pack_native, quantize_int4
    from data_plane.model.quant.int8 import dequantize_int8, quantize_int8

    g = torch.Generator().manual_seed(0)
    # device named: the first call may come while a model is built under torch.device("meta")
    x = torch.randn(11, 256, generator=g, device="cpu")
    checks = []
    for group_size in (128, 64, 32):
        w = torch.randn(24, 256, generator=g, device="cpu")
        q, scale, offset = quantize_int4(w, group_size)
        got = kernel.int4_mm(x, kernel.int4_weight(pack_native(q, group_size), scale, offset, group_size))
        checks.append((f"int4, group {group_size}", got, dequantize_int4(q, scale, offset)))
    w = torch.randn(24, 250, generator=g, device="cpu")  # a width past the last whole vector
    q8, scale8 = quantize_int8(w)
    padded = torch.nn.functional.pad(q8, (0, 6))  # (24, 256): rows K_pad apart, as int8.py holds them
    checks.append(
        (
            "int8",
            kernel.int8_mm(x[:, :250].contiguous(), kernel.int8_weight(padded, scale8)),
            dequantize_int8(q8, scale8),
        )
    )
    results = [
        (name, got, x[:, : weight.shape[1]].double() @ weight.double().T) for name, got, weight in checks
    ]
    results += _sgmv_checks(kernel, g)
    results += _attention_checks(kernel, g)
    for name, got, want in results:
        error = float((got.double() - want).abs().max() / want.abs().max())
        if not error < 1e-5:
            message = f"{kernel.path.name} disagrees with torch ({name}: {error:.1e})"
            raise _CachedFileBad(message, kernel.path) if kernel.cached else _Unavailable(message)


def _sgmv_checks(kernel: NativeKernels, g: torch.Generator) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, kernel's y, float64 y) of a shrink and expand over segments of mixed lengths and ranks, a
    two-slice rank-interleaved A, and B in both layouts."""
    slots, rows, k, out, n = 5, 11, 70, 37, 2
    layout = [(0, 1, 3, 5), (1, 5, 1, 8), (6, 11, 0, 3), (5, 6, 4, 8)]  # (start, end, slot, rank)
    segments = NativeSegments(layout, rows, slots)
    x = torch.randn(rows, k, generator=g, device="cpu")
    a = torch.randn(slots, 8 * n, k, generator=g, device="cpu")
    b = torch.randn(slots, out, 8, generator=g, device="cpu")
    scale = torch.rand(slots, generator=g, device="cpu")
    want = torch.zeros(rows, out, dtype=torch.float64, device="cpu")
    for start, end, slot, rank in layout:
        slice_a = a[slot, : rank * n].view(rank, n, k)[:, 1].double()  # slice 1 of the interleaved columns
        want[start:end] = scale[slot].double() * (
            x[start:end].double() @ slice_a.T @ b[slot, :, :rank].double().T
        )
    u = kernel.sgmv_shrink(x, a, segments, rank_columns=n)
    results = []
    for b_layout, pool in (
        ("(S, O, R)", b),
        ("outputs contiguous", b.transpose(1, 2).contiguous().transpose(1, 2)),
    ):
        y = torch.zeros(rows, out, device="cpu")
        kernel.sgmv_expand(u[:, 1::n], pool, scale, segments, y)
        results.append((f"SGMV, B {b_layout}", y, want))
    # The one-call path, over these few segments (shrink, then expands) and over enough one-row segments
    # that each work item takes a whole segment at this thread count.
    many = 4 * torch.get_num_threads() + 1
    for name, segs, num_rows in (
        ("few segments", layout, rows),
        ("by segment", [(t, t + 1, t % slots, 3 + t % 6) for t in range(many)], many),
    ):
        x = torch.randn(num_rows, k, generator=g, device="cpu")
        want = torch.zeros(num_rows, 2 * out, dtype=torch.float64, device="cpu")
        for start, end, slot, rank in segs:
            for i in range(n):
                slice_a = a[slot, : rank * n].view(rank, n, k)[:, i].double()
                want[start:end, i * out : (i + 1) * out] = scale[slot].double() * (
                    x[start:end].double() @ slice_a.T @ b[slot, :, :rank].double().T
                )
        y = torch.zeros(num_rows, 2 * out, device="cpu")
        scales = torch.stack([scale, scale]).contiguous()
        pools = [b, b.transpose(1, 2).contiguous().transpose(1, 2)]
        segments = NativeSegments(segs, num_rows, slots)
        kernel.sgmv_lora(x, a, pools, scales, segments, y, range(n), [(0, out), (out, 2 * out)])
        results.append((f"SGMV in one call, {name}", y, want))
    # Slots in each format: slot 1 float16 and slot 3 bfloat16 in every pool, their values those formats
    # hold, widened by the kernels as they load them (the CPU's conversion, or the bit arithmetic), over
    # both ways of sharing the work out.
    formats = {1: torch.float16, 3: torch.bfloat16}
    a_mixed, b_mixed = a.clone(), b.transpose(1, 2).contiguous().transpose(1, 2)
    for slot, dtype in formats.items():
        a_mixed[slot], b_mixed[slot] = a_mixed[slot].to(dtype).float(), b_mixed[slot].to(dtype).float()
    wanted = {}
    for name, segs in (
        ("few segments", layout),
        ("by segment", [(t, t + 1, t % slots, 3 + t % 6) for t in range(many)] + [(many, many + 7, 1, 8)]),
    ):
        num_rows = max(end for _, end, _, _ in segs)
        x = torch.randn(num_rows, k, generator=g, device="cpu")
        want = torch.zeros(num_rows, out, dtype=torch.float64, device="cpu")
        for start, end, slot, rank in segs:
            slice_a = a_mixed[slot, : rank * n].view(rank, n, k)[:, 0].double()
            want[start:end] = scale[slot].double() * (
                x[start:end].double() @ slice_a.T @ b_mixed[slot, :, :rank].double().T
            )
        codes = [SLOT_FORMATS[formats.get(slot, torch.float32)] for _, _, slot, _ in segs]
        wanted[name] = (x, want, NativeSegments(segs, num_rows, slots, codes))
    for slot, dtype in formats.items():  # into the 16-bit views: the float32 bytes no longer hold them
        packed_view(a_mixed, dtype)[slot] = a_mixed[slot].to(dtype)
        packed_view(b_mixed, dtype)[slot] = b_mixed[slot].to(dtype)
    for name, (x, want, segments) in wanted.items():
        y = torch.zeros(x.shape[0], out, device="cpu")
        scales = torch.stack([scale, scale]).contiguous()
        kernel.sgmv_lora(x, a_mixed, [b_mixed, b_mixed], scales, segments, y, [0], [(0, out), (out, 2 * out)])
        results.append((f"SGMV, float16 and bfloat16 slots, {name}", y, want))
    return results


def _attention_checks(
    kernel: NativeKernels, g: torch.Generator
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, kernel's out, float64 out) of paged decode attention: two kv heads of three queries each,
    contexts within one block, across several and up to the table's end, blocks out of order, with and
    without a window."""
    num_blocks, block_size, kv_heads, group, head_dim = 9, 4, 2, 3, 20
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g, device="cpu")
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g, device="cpu")
    block_tables = torch.tensor([[5, 0, 0, 0], [2, 7, 0, 0], [8, 1, 3, 6], [4, 6, 1, 2]], device="cpu")
    context_lens = torch.tensor([1, 7, 13, 16], device="cpu")
    q = torch.randn(4, kv_heads * group, head_dim, generator=g, device="cpu")
    tables = kernel.decode_tables(block_tables, context_lens)
    results = []
    for window in (None, 5):
        want = torch.zeros(q.shape, dtype=torch.float64, device="cpu")
        for d, length in enumerate(context_lens.tolist()):
            first = 0 if window is None else max(0, length - window)
            k = k_cache[block_tables[d]].reshape(-1, kv_heads, head_dim)[first:length].double()
            v = v_cache[block_tables[d]].reshape(-1, kv_heads, head_dim)[first:length].double()
            for h in range(kv_heads * group):
                weights = torch.softmax(0.25 * (k[:, h // group] @ q[d, h].double()), dim=0)
                want[d, h] = weights @ v[:, h // group]
        got = kernel.paged_decode(q, k_cache, v_cache, tables, 0.25, window)
        results.append((f"paged decode attention, window {window}", got, want))
    # Rotary and cache writes: q, k and v as column views of one fused output, rows to scattered slots.
    rows, heads = 5, kv_heads * group
    fused = torch.randn(rows, (heads + 2 * kv_heads) * head_dim, generator=g, device="cpu")
    q, k, v = fused.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=1)
    q, k, v = (t.view(rows, -1, head_dim) for t in (q, k, v))
    cos, sin = (torch.randn(rows, 1, head_dim, generator=g, device="cpu") for _ in range(2))
    slot_ids = torch.tensor([3, 0, 35, 17, 8], device="cpu")

    def rotated(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.double().chunk(2, dim=-1)
        return x.double() * cos.double() + torch.cat((-x2, x1), dim=-1) * sin.double()

    want_q, want_k, want_v = rotated(q), rotated(k), v.double()
    kernel.kv_slots(slot_ids).rope_kv_write(q, k, v, (cos, sin), k_cache, v_cache)
    flat_k, flat_v = (c.view(-1, kv_heads, head_dim)[slot_ids] for c in (k_cache, v_cache))
    results += [
        ("rotary, q", q, want_q),
        ("rotary, keys written", flat_k, want_k),
        ("values written", flat_v, want_v),
    ]
    return results


def _vector_name(bits: int) -> str:
    return {512: "AVX-512", 256: "AVX2"}.get(bits, "plain C, no vector path for this CPU")
