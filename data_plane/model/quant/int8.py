"""int8: per-output-channel symmetric weight-only quantization.

    scale[n] = max_k |W[n, k]| / 127            (bfloat16)
    q[n, k]  = clamp(round(W[n, k] / scale[n]), -127, 127)   (int8)
    W[n, k] ~ q[n, k] * scale[n]

On CUDA the kernel is `openlora_kernels.triton_ops.int8_matmul` (codes widened in registers, tensor-core sums):
PyTorch's `_weight_int8pack_mm` ran there 5.6x slower than a bfloat16 matmul at 1 row and 48x at 32 rows
(H200, benchmarks/RESULTS.md). Elsewhere it is `_weight_int8pack_mm` on bfloat16 activations; where a
device lacks it, the weight is dequantized per call (correct, slower). The CPU kernel reads past the end of a row
whose length is not a multiple of 16 (a crash, measured with torch 2.13), so the input dimension is
zero-padded to one and the activations padded to match.

float32 activations on CPU: up to NATIVE_MM_MAX_TOKENS rows (decode) go through `int8_cpu.c` (native.py;
built for the machine at first use), which widens each code to float32 in registers: exact products at
the speed of reading 8-bit codes, on every CPU with a C compiler. More rows (prefill, large batches) take
a more precise path than PyTorch's bfloat16 one where it is fast, since `_weight_int8pack_mm` rounds its input
and output to bfloat16 (2^-9 relative each): each row of x is written as two int8 digits on a per-row
scale, x[t] ~ sx[t] * (256 * high[t] + low[t]) (16 bits, error at most max|x[t]| / 65024), and each digit
is multiplied by the int8 weight with `torch._int_mm`, whose int32 sums are exact:

    y[t, n] = sx[t] * scale[n] * (256 * (high[t] . q[n]) + (low[t] . q[n]))

Cost, measured on a shared 2-core CPU with AVX-512 (VNNI, bf16) (min of repeats): at 1 row, where decode
reads every weight from memory, about 1.4x `_weight_int8pack_mm`, since each digit's product reads the
weight once (both digits as one 2-row product were slower still there); at 32 rows about the same. On an
Intel CPU with AMX a 2-row `_int_mm` costs what a 1-row one does, so there both digits go through one
product (`two_digit_stacks`, measured once per process like the path itself). An element
far below its row's largest (under max/256) is held less precisely than bfloat16 would; typical
activations are not that skewed. On an AVX2-only CPU `torch._int_mm` has no fast kernel: the same path
measured 19x `_weight_int8pack_mm` at 1 row and 33x at 32 (benchmarks/RESULTS.md). So the path is chosen
per machine by measurement, once per process (`two_digit_path_chosen`): taken where it costs at most
TWO_DIGIT_MAX_COST times `_weight_int8pack_mm` on a 1-row product, else float32 activations go through
`_weight_int8pack_mm` in bfloat16 like the others (faster; the LoRA parity of 1e-3 then does not hold).
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.nn import functional as F

from data_plane.model.quant.base import COMPUTE_DTYPE, QuantLinear, one_thread, round_up, row_chunks
from data_plane.model.quant.native import INT8_IN_MULTIPLE, Int8Weight, NativeKernels, native_kernels

log = logging.getLogger(__name__)

_IN_MULTIPLE = INT8_IN_MULTIPLE  # native.py checks x against the same padding
# The two-digit path is used where it costs at most this many times `_weight_int8pack_mm`. Measured (1 row,
# 1024 square): 1.4-1.6x on an AMD CPU with AVX-512 VNNI, 3.6-3.9x on an Intel one with AMX, 14-19x on an
# AVX2-only one. The bound sits about 2x from the nearest of them, so one machine's choice does not flip
# between processes with the noise of a busy CPU (a bound of 4 did, on the Intel machine).
TWO_DIGIT_MAX_COST = 8.0
# Stacked digits up to this many rows: at 128 rows the two products of T rows were faster (Intel, AMX).
STACK_MAX_ROWS = 32
_DIGIT_RANGE = 127 * 256  # |256 * high + low| for high in [-127, 127], low in [-128, 127]
# float32 activations of at most this many rows take the native kernel (its cost grows with the rows, the
# int8 products' hardly: `python -m benchmarks.quant_bench` prints the crossover, RESULTS.md).
NATIVE_MM_MAX_TOKENS = 8


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (N, K) float -> (q (N, K) int8, scale (N,) bfloat16)."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127).to(COMPUTE_DTYPE)  # (N,)
    divisor = scale.float().clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(1)
    q = torch.round(w / divisor).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(q (N, K) int8, scale (N,)) -> W (N, K) float32."""
    return q.float() * scale.float().unsqueeze(1)


@functools.cache
def has_int8_kernel(device_type: str) -> bool:
    """Whether `_weight_int8pack_mm` runs on this kind of device (probed once on a tiny input)."""
    try:
        x = torch.ones(1, 32, dtype=COMPUTE_DTYPE, device=device_type)
        q = torch.ones(16, 32, dtype=torch.int8, device=device_type)
        s = torch.ones(16, dtype=COMPUTE_DTYPE, device=device_type)
        torch.ops.aten._weight_int8pack_mm(x, q, s)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def int8_two_digit_mm(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, stacked: bool = False
) -> torch.Tensor:
    """x (T, K) float32, qweight (N, K) int8, scale (N,) -> x @ (qweight * scale).T (T, N) float32, with x
    split into two int8 digits per element on a per-row scale (see the module docstring). `stacked`: up to
    STACK_MAX_ROWS rows, both digits go through one product of 2T rows (the weight read once, not twice),
    with the same integer sums, so the same result to the bit."""
    x_scale = x.abs().amax(dim=1, keepdim=True).clamp_(min=torch.finfo(torch.float32).tiny) / _DIGIT_RANGE
    v = torch.round(x / x_scale)  # (T, K) integers in [-_DIGIT_RANGE, _DIGIT_RANGE]
    high = torch.floor(v * (1 / 256) + 0.5)  # (T, K) in [-127, 127]
    low = v.sub_(high, alpha=256)  # (T, K) in [-128, 127]
    weight_t = qweight.T  # (K, N) view
    # Each product sums at most K * 127 * 128 in int32 (exact below K = 132,000); the float32 result of
    # the sum is rounded once, to 2^-24.
    rows = x.shape[0]
    if stacked and rows <= STACK_MAX_ROWS:
        both = torch._int_mm(torch.cat([high, low]).to(torch.int8), weight_t).float()  # (2T, N)
        y = both[:rows].mul_(256).add_(both[rows:])
    else:
        y = torch._int_mm(high.to(torch.int8), weight_t).float().mul_(256)  # (T, N)
        y += torch._int_mm(low.to(torch.int8), weight_t)
    return y.mul_(x_scale).mul_(scale.float())


@dataclass(frozen=True)
class TwoDigitTimes:
    """A 1-row product's least time, seconds: `_weight_int8pack_mm` (None where the device lacks it) and
    the two-digit path with its digits in two products or stacked in one."""

    packed_s: float | None
    separate_s: float
    stacked_s: float

    @property
    def stacks(self) -> bool:
        return self.stacked_s < self.separate_s

    @property
    def cost(self) -> float | None:
        """The two-digit path's time in its faster layout over `_weight_int8pack_mm`'s (None without it)."""
        if self.packed_s is None:
            return None
        return min(self.separate_s, self.stacked_s) / max(self.packed_s, 1e-9)


def measure_two_digit_times(size: int = 1024, repeats: int = 5) -> TwoDigitTimes:
    """Times a 1-row product with a (size, size) int8 weight: the least of `repeats` timed calls each,
    after one untimed."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, size, generator=g)
    q = torch.randint(-127, 128, (size, size), generator=g, dtype=torch.int8)
    s = torch.full((size,), 1e-3, dtype=COMPUTE_DTYPE)

    def least_s(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return min(times)

    packed = None
    if has_int8_kernel("cpu"):
        packed = least_s(lambda: torch.ops.aten._weight_int8pack_mm(x.to(COMPUTE_DTYPE), q, s))
    separate = least_s(lambda: int8_two_digit_mm(x, q, s))
    stacked = least_s(lambda: int8_two_digit_mm(x, q, s, stacked=True))
    return TwoDigitTimes(packed, separate, stacked)


@functools.cache
def two_digit_times() -> TwoDigitTimes:
    """This machine's `measure_two_digit_times`, measured once per process: both choices below read it."""
    return measure_two_digit_times()


def two_digit_stacks() -> bool:
    """Whether this machine's two-digit path stacks both digits into one product: one `_int_mm` of 2 rows
    cost as much as one of 1 row on an Intel CPU with AMX (1.9x faster than two products at 1 row, 1.4x
    at 32), while a 2-row product was the slower on an AMD one."""
    return two_digit_times().stacks


@functools.cache
def two_digit_path_chosen() -> bool:
    """Whether float32 CPU activations take the two-digit path on this machine (see the module docstring)."""
    cost = two_digit_times().cost
    if cost is None:
        return True  # no `_weight_int8pack_mm`: the alternative is dequantizing per call
    chosen = cost <= TWO_DIGIT_MAX_COST
    log.info(
        "int8 on this CPU: the two-digit float32 path costs %.1fx _weight_int8pack_mm; float32 activations go "
        "through %s",
        cost,
        "the two-digit path" if chosen else "_weight_int8pack_mm in bfloat16",
    )
    return chosen


class Int8Linear(QuantLinear):
    format = "int8"
    bits = 8
    required_ops: ClassVar[dict[str, tuple[str, ...]]] = {"cpu": ("_weight_int8pack_mm",)}  # CUDA: Triton

    def __init__(self, in_features: int, out_features: int, device: torch.device) -> None:
        super().__init__(in_features, out_features, device)
        self.padded_in_features = round_up(in_features, _IN_MULTIPLE)
        self.register_buffer("qweight", torch.empty(0, dtype=torch.int8, device=device))  # (N, K_pad)
        self.register_buffer("scale", torch.empty(0, dtype=COMPUTE_DTYPE, device=device))  # (N,)
        # float32 CPU activations take the two-digit path: decided as the weight loads (the one-time
        # measurement runs then, not in a forward), never per call.
        self.two_digit = False
        self.two_digit_stacked = False
        self.native: NativeKernels | None = None  # the CPU's float32 kernels, when this machine builds them
        self._native_weight: Int8Weight | None = None  # the buffers checked once for the C code

    def load_rows(self, start: int, rows: torch.Tensor) -> None:
        end = self._check_rows(start, rows)
        if self.qweight.numel() == 0:
            n = self.out_features
            self.qweight = torch.zeros(n, self.padded_in_features, dtype=torch.int8, device=self.device)
            self.scale = torch.zeros(n, dtype=COMPUTE_DTYPE, device=self.device)
            self.two_digit = self.device.type == "cpu" and two_digit_path_chosen()
            self.two_digit_stacked = self.two_digit and two_digit_stacks()
            self.native = native_kernels() if self.device.type == "cpu" else None
        k = self.in_features
        with one_thread():
            for lo, hi in row_chunks(end - start, k, 1):
                q, s = quantize_int8(rows[lo:hi].to(self.device))
                self.qweight[start + lo : start + hi, :k], self.scale[start + lo : start + hi] = q, s

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_native(x):
            weight = self._native_weight
            if weight is None or not weight.holds(self.qweight, self.scale):
                weight = self._native_weight = self.native.int8_weight(self.qweight, self.scale)
            return self.native.int8_mm(x.contiguous(), weight)
        if self.padded_in_features != self.in_features:
            x = F.pad(x, (0, self.padded_in_features - self.in_features))  # (T, K_pad)
        if x.dtype == torch.float32 and self.two_digit:
            return int8_two_digit_mm(x, self.qweight, self.scale, self.two_digit_stacked)
        xc = x.to(COMPUTE_DTYPE)  # (T, K_pad)
        if x.device.type == "cuda":
            from openlora_kernels.triton_ops.int8_matmul import (
                int8_weight_matmul,
            )  # imported where CUDA runs it

            return int8_weight_matmul(xc, self.qweight, self.scale).to(x.dtype)
        if has_int8_kernel(x.device.type):
            y = torch.ops.aten._weight_int8pack_mm(xc, self.qweight, self.scale)  # (T, N)
        else:
            y = xc @ (self.qweight.to(COMPUTE_DTYPE) * self.scale.unsqueeze(1)).T
        return y.to(x.dtype)

    def uses_native(self, x: torch.Tensor) -> bool:
        """Whether `kernel(x)` takes the native float32 kernel: float32 rows, few of them, a vector build."""
        return (
            self.native is not None
            and bool(self.native.vector_bits)
            and x.dtype == torch.float32
            and x.shape[0] <= NATIVE_MM_MAX_TOKENS
        )

    def dequantize(self) -> torch.Tensor:
        return dequantize_int8(self.qweight[:, : self.in_features], self.scale)
