"""int4: asymmetric uint4 weight-only quantization in groups along the input dimension.

For each output row n and group g of `group_size` consecutive input columns (bfloat16 scale and offset):

    scale[n, g]  = (max - min) / 15
    offset[n, g] = min + 8 * scale[n, g]          (the value of code 8: a zero point in the float domain)
    q[n, k]      = clamp(round((W[n, k] - offset) / scale + 8), 0, 15)
    W[n, k] ~ (q[n, k] - 8) * scale[n, g] + offset[n, g]

The group size is 128, else 64 or 32, whichever divides the input dimension; a dimension that none divides
cannot be grouped and is refused (`QuantizationError`). Two kernels, one per device type:
- CPU: `int4_cpu.c` (built at first use, native.py), float32 activations, accumulation and output, so the
  linear computes exactly what its dequantized weight gives. Codes two to a byte, per group (the low nibbles
  the first half of the group's columns, the high nibbles the second), scale and offset (N, G). Up to
  `NATIVE_MM_MAX_TOKENS` rows of x go through its fused kernel; more are one float32 GEMM over the weight
  dequantized a block of rows at a time (benchmarks/RESULTS.md has the crossover).
- CUDA sm80+, and the CPU where the library cannot be built: PyTorch's tinygemm (`_weight_int4pack_mm`,
  `_weight_int4pack_mm_for_cpu`) on bfloat16 activations, which rounds each linear's input and output to
  bfloat16. Output rows are padded to its multiple of 16 and cut from the result.
"""

from __future__ import annotations

import threading
from typing import ClassVar

import torch
from torch.nn import functional as F

from data_plane.model.quant.base import (
    COMPUTE_DTYPE,
    QuantizationError,
    QuantLinear,
    one_thread,
    round_up,
    row_chunks,
)
from data_plane.model.quant.native import Int4Weight, NativeKernels, native_kernels

GROUP_SIZES = (128, 64, 32)
_ROW_MULTIPLE = 16  # tinygemm packs output rows in tiles (16 on CPU, 8 on CUDA)
# Rows packed per chunk: a multiple of 64, where the CPU layout of a block of rows is that of the whole
# (measured: 16- and 32-row chunks interleave differently); CUDA's 8-row tiles divide it too.
_CHUNK_ROW_MULTIPLE = 64
_DEQUANT_ROWS = 256
# The native CPU kernel's fused path serves up to this many rows of x; past it, dequantizing a block of
# weight rows and one float32 GEMM per block is faster (measured crossover 16-32 rows on AVX-512 and AVX2,
# RESULTS.md). A build without a vector path takes the GEMM at every size.
NATIVE_MM_MAX_TOKENS = 16
_NATIVE_BLOCK_ELEMENTS = 1 << 20  # weight elements dequantized per GEMM: 4 MiB of float32


def int4_group_size(in_features: int) -> int | None:
    """The group size of an input dimension: 128, else 64, else 32; None when none of them divides it."""
    return next((size for size in GROUP_SIZES if in_features % size == 0), None)


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight (N, K) float, K a multiple of group_size -> (q (N, K) uint8 in [0, 15],
    scale (N, K / group_size) bfloat16, offset (N, K / group_size) bfloat16)."""
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of group_size {group_size}")
    w = weight.float().view(n, k // group_size, group_size)  # (N, G, group)
    low, high = w.amin(dim=2), w.amax(dim=2)
    scale = ((high - low) / 15).to(COMPUTE_DTYPE)  # (N, G)
    offset = (low + 8 * scale.float()).to(COMPUTE_DTYPE)
    divisor = scale.float().clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(2)
    q = torch.round((w - offset.float().unsqueeze(2)) / divisor + 8).clamp_(0, 15)
    return q.to(torch.uint8).view(n, k), scale, offset


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """(q (N, K) uint8, scale (N, G), offset (N, G)) -> W (N, K) float32."""
    n, k = q.shape
    groups = scale.shape[1]
    codes = q.float().view(n, groups, k // groups)  # (N, G, group)
    return ((codes - 8) * scale.float().unsqueeze(2) + offset.float().unsqueeze(2)).view(n, k)


_blocks = threading.local()


def _block_buffer(num_elements: int) -> torch.Tensor:
    """This thread's float32 buffer for dequantized blocks, at least `num_elements` long: one allocation
    for every int4 linear, not one per block (a fresh 4 MiB block was mapped and faulted in each time
    where the allocator returns large blocks to the system)."""
    buffer = getattr(_blocks, "buffer", None)
    if buffer is None or buffer.numel() < num_elements:
        buffer = _blocks.buffer = torch.empty(num_elements, dtype=torch.float32, device="cpu")
    return buffer


def pack_native(q: torch.Tensor, group_size: int) -> torch.Tensor:
    """q (N, K) uint8 codes -> (N, K / 2) uint8 in int4_cpu.c's layout: per group, byte j holds column j
    in its low nibble and column group_size / 2 + j in its high one."""
    n, k = q.shape
    halves = q.view(n, k // group_size, 2, group_size // 2)  # (N, G, 2, group / 2)
    return (halves[:, :, 0] | halves[:, :, 1] << 4).reshape(n, k // 2)


def _pack(q: torch.Tensor, k: int) -> torch.Tensor:
    """q (rows, K) uint8 codes -> the tinygemm layout of q's device."""
    if q.device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    inner_k_tiles = 8 if k % 128 == 0 else 4 if k % 64 == 0 else 2
    pairs = (q[:, ::2] << 4 | q[:, 1::2]).contiguous()  # (rows, K / 2) uint8, even column high
    return torch.ops.aten._convert_weight_to_int4pack(pairs, inner_k_tiles)


def _int4_mm(
    x: torch.Tensor, packed: torch.Tensor, group_size: int, scale_offset: torch.Tensor
) -> torch.Tensor:
    if x.device.type == "cpu":
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scale_offset)
    return torch.ops.aten._weight_int4pack_mm(x, packed, group_size, scale_offset)


class Int4Linear(QuantLinear):
    format = "int4"
    bits = 4
    # A block of rows packs as the same rows of the whole weight when it starts at a multiple of 64 (the
    # tinygemm layout; the native one takes any row, and keeps the same rule so a model loads one way).
    row_multiple = _CHUNK_ROW_MULTIPLE
    required_ops: ClassVar[dict[str, tuple[str, ...]]] = {  # the CPU pair came with torch 2.6
        "cpu": ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu"),
        "cuda": ("_convert_weight_to_int4pack", "_weight_int4pack_mm"),
    }

    @classmethod
    def check_shape(cls, in_features: int, out_features: int) -> None:
        if int4_group_size(in_features) is None:
            raise QuantizationError(
                f"int4 needs in_features to be a multiple of {GROUP_SIZES[-1]} (it groups the input "
                f"dimension by 128, 64 or 32 columns), got {in_features}"
            )

    def __init__(
        self, in_features: int, out_features: int, device: torch.device, allow_native: bool = True
    ) -> None:
        self.check_shape(in_features, out_features)
        super().__init__(in_features, out_features, device)
        self.group_size = int4_group_size(in_features)
        # The CPU's float32 kernel when this machine can build it; else tinygemm (see the module docstring).
        # `allow_native=False` takes tinygemm anyway (the benchmark's comparison).
        cpu = self.device.type == "cpu"
        self.native: NativeKernels | None = native_kernels() if cpu and allow_native else None
        self._native_weight: Int4Weight | None = None  # the buffers checked once for the C code
        if self.native is not None:
            self.padded_out_features = out_features
            # Allocated by the first rows loaded: the loader builds the model on the meta device and casts
            # it to the model dtype before any weight arrives, which would turn bfloat16 buffers to float32.
            self.register_buffer("codes", torch.empty(0, dtype=torch.uint8, device=device))  # (N, K / 2)
            self.register_buffer("scale", torch.empty(0, dtype=COMPUTE_DTYPE, device=device))  # (N, G)
            self.register_buffer("offset", torch.empty(0, dtype=COMPUTE_DTYPE, device=device))  # (N, G)
            return
        self.padded_out_features = round_up(out_features, _ROW_MULTIPLE)
        self.register_buffer("packed", torch.empty(0, dtype=torch.uint8, device=device))
        # (K / group_size, N_pad, 2): [..., 0] scale, [..., 1] offset, as the kernels read them.
        self.register_buffer("scale_offset", torch.empty(0, dtype=COMPUTE_DTYPE, device=device))
        self._parts: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}  # row blocks until all arrive

    @property
    def kernel_name(self) -> str:
        """Which kernel serves this weight (the worker's startup log names it)."""
        if self.native is None:
            return f"tinygemm ({self.device.type}, bfloat16 activations)"
        return f"native float32 ({'vector' if self.native.vector_bits else 'plain C'})"

    def load_rows(self, start: int, rows: torch.Tensor) -> None:
        end = self._check_rows(start, rows)
        if self.native is not None:
            if self.codes.numel() == 0:
                n, k, groups = self.out_features, self.in_features, self.in_features // self.group_size
                self.codes = torch.zeros(n, k // 2, dtype=torch.uint8, device="cpu")
                self.scale = torch.zeros(n, groups, dtype=COMPUTE_DTYPE, device="cpu")
                self.offset = torch.zeros(n, groups, dtype=COMPUTE_DTYPE, device="cpu")
            with one_thread():
                for lo, hi in row_chunks(end - start, self.in_features, 1):
                    q, scale, offset = quantize_int4(rows[lo:hi].cpu(), self.group_size)
                    self.codes[start + lo : start + hi] = pack_native(q, self.group_size)
                    self.scale[start + lo : start + hi] = scale
                    self.offset[start + lo : start + hi] = offset
            return
        k = self.in_features
        # The block that ends the weight also packs the zero rows that pad it to the kernels' multiple.
        num_rows = (self.padded_out_features if end == self.out_features else end) - start
        if num_rows % self.row_multiple and end != self.out_features:
            raise ValueError(f"rows {start}:{end} end inside a block of {self.row_multiple} rows")
        packed, scale_offset = [], []
        with one_thread():
            for lo, hi in row_chunks(num_rows, k, _CHUNK_ROW_MULTIPLE):
                chunk = rows[lo:hi].to(self.device)  # (r, K); empty past the real rows
                chunk = F.pad(chunk, (0, 0, 0, (hi - lo) - chunk.shape[0]))  # (R, K), zero rows
                q, scale, offset = quantize_int4(chunk, self.group_size)
                packed.append(_pack(q, k))
                scale_offset.append(torch.stack((scale.T, offset.T), dim=2))  # (G, R, 2)
        self._parts[start] = (num_rows, torch.cat(packed), torch.cat(scale_offset, dim=1))
        if sum(part[0] for part in self._parts.values()) == self.padded_out_features:
            parts = [self._parts[key] for key in sorted(self._parts)]  # in row order: the layouts concatenate
            self.packed = torch.cat([part[1] for part in parts])
            self.scale_offset = torch.cat([part[2] for part in parts], dim=1).contiguous()
            self._parts = {}

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        if self.native is not None:
            return self._native_kernel(x)
        xc = x.to(COMPUTE_DTYPE)  # (T, K)
        y = _int4_mm(xc, self.packed, self.group_size, self.scale_offset)  # (T, N_pad)
        if self.padded_out_features != self.out_features:
            y = y[:, : self.out_features].contiguous()  # LoRA adds into it in place
        return y.to(x.dtype)

    def _native_kernel(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float().contiguous()  # (T, K)
        if xf.shape[0] <= NATIVE_MM_MAX_TOKENS and self.native.vector_bits:
            return self.native_fused(xf).to(x.dtype)
        return self.native_blocks(xf).to(x.dtype)

    def native_weight(self) -> Int4Weight:
        """The buffers as the native kernels take them, checked when first used (and again should the
        buffers be replaced): the kernels then check only x per call."""
        weight = self._native_weight
        if weight is None or not weight.holds(self.codes, self.scale, self.offset):
            weight = self.native.int4_weight(self.codes, self.scale, self.offset, self.group_size)
            self._native_weight = weight
        return weight

    def native_fused(self, xf: torch.Tensor) -> torch.Tensor:
        """xf (T, K) float32 -> (T, N) float32 through the fused kernel (one pass over the packed weight)."""
        return self.native.int4_mm(xf, self.native_weight())

    def native_blocks(self, xf: torch.Tensor) -> torch.Tensor:
        """xf (T, K) float32 -> (T, N) float32: the weight dequantized a block of rows at a time (4 MiB of
        float32, in cache) into one buffer of this thread's, each block one float32 GEMM."""
        rows = max(1, _NATIVE_BLOCK_ELEMENTS // self.in_features)
        buffer = _block_buffer(rows * self.in_features)
        weight = self.native_weight()
        blocks = []
        for start in range(0, self.out_features, rows):
            end = min(start + rows, self.out_features)
            block = buffer[: (end - start) * self.in_features].view(end - start, self.in_features)
            self.native.int4_dequantize(weight, start, end, out=block)
            blocks.append(F.linear(xf, block))  # (T, end - start)
        return torch.cat(blocks, dim=1)

    def dequantize(self) -> torch.Tensor:
        if self.native is not None:
            return self.native.int4_dequantize(self.native_weight())
        # The packed layout is the kernel's own, so read it back through the kernel: rows of the identity.
        # On CPU in float32 (exact); the CUDA kernel takes bfloat16 only (its output is rounded to it).
        k = self.in_features
        dtype = torch.float32 if self.device.type == "cpu" else COMPUTE_DTYPE
        scale_offset = self.scale_offset.to(dtype)
        columns = []
        for start in range(0, k, _DEQUANT_ROWS):
            end = min(start + _DEQUANT_ROWS, k)
            eye = torch.zeros(end - start, k, dtype=dtype, device=self.device)  # (r, K)
            eye[torch.arange(end - start), torch.arange(start, end)] = 1
            columns.append(_int4_mm(eye, self.packed, self.group_size, scale_offset).float())  # (r, N_pad)
        w_t = torch.cat(columns)  # (K, N_pad)
        return w_t[:, : self.out_features].T.contiguous()
