"""Compute roofline of a decode step on this machine: the FLOPs a token costs and measured GEMM FLOP/s.

A decode token runs every linear of the model once on one row: q, k, v, o, gate, up and down in each
layer, and lm_head. Each costs 2 x in x out FLOPs (a multiply and an add per weight), so a token costs
2 x (linear parameters) FLOPs. The embedding is a lookup (no FLOPs) and norms, rotary and activations are
a few FLOPs per element, left out. Attention's two matmuls (q.k over the context, then the weighted sum
of v) cost 4 x heads x head_dim x context FLOPs per layer: reported on its own, since it grows with the
context while the linears do not.

The machine's rate is measured in the benchmark's own process and threads, through torch's BLAS
(`torch.matmul`) and through oneDNN (the engine's float32 CPU linears), taking the faster of the two for
each shape, twice: at the model's linear shapes on `rows` rows (what a decode step of that many sequences
runs), and at one large square size (what the machine sustains at its best). The roofline is the larger of the two: the
fastest rate this machine showed in the run, so that a share of it is never flattered by shapes that
happen to run slowly here (the share of the model-shaped rate alone is reported beside it).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from data_plane.model.dense import ONEDNN, dense_matmul, onednn_linear
from openlora.base_model import BaseModelSpec


@dataclass(frozen=True)
class LinearShape:
    name: str
    in_features: int
    out_features: int
    count: int  # how many of it one token runs through

    @property
    def params(self) -> int:
        return self.in_features * self.out_features * self.count


def model_linear_shapes(spec: BaseModelSpec) -> list[LinearShape]:
    """The linears a decode token runs through: the seven projections of every layer, then lm_head."""
    hidden, inter, layers = spec.hidden_size, spec.intermediate_size, spec.num_layers
    q_out = spec.num_attention_heads * spec.head_dim
    kv_out = spec.num_key_value_heads * spec.head_dim
    return [
        LinearShape("q_proj", hidden, q_out, layers),
        LinearShape("k_proj", hidden, kv_out, layers),
        LinearShape("v_proj", hidden, kv_out, layers),
        LinearShape("o_proj", q_out, hidden, layers),
        LinearShape("gate_proj", hidden, inter, layers),
        LinearShape("up_proj", hidden, inter, layers),
        LinearShape("down_proj", inter, hidden, layers),
        LinearShape("lm_head", hidden, spec.vocab_size, 1),
    ]


def linear_params_per_token(shapes: list[LinearShape]) -> int:
    return sum(s.params for s in shapes)


def linear_flops_per_token(shapes: list[LinearShape]) -> int:
    """2 FLOPs (multiply, add) per weight of every linear a token runs through."""
    return 2 * linear_params_per_token(shapes)


def lora_params_per_adapter(shapes: list[LinearShape], rank: int) -> int:
    """A and B factors of one adapter of `rank` on every decoder projection (lm_head left alone):
    rank x (in + out) per projection and layer."""
    return sum(rank * (s.in_features + s.out_features) * s.count for s in shapes if s.name != "lm_head")


def adapter_ceilings(spec: BaseModelSpec, rank: int, distinct_adapters: int) -> dict:
    """What `distinct_adapters` adapters of `rank` on every projection can cost a decode step of at least
    as many rows, by arithmetic alone: each adapter's factors are read once per step, the base weights
    once. Bound by reading weights, the step takes (base + LoRA) / base as long, so the throughput ratio
    against the base model is at most base / (base + LoRA) bytes (the factors held in the base weights'
    dtype); bound by FLOPs, each row adds 2 x its adapter's parameters to the base's 2 x linear parameters.
    A measured ratio between the two says the step is neither purely bandwidth- nor compute-bound."""
    shapes = model_linear_shapes(spec)
    base = linear_params_per_token(shapes)
    lora = lora_params_per_adapter(shapes, rank)
    return {
        "base_linear_params": base,
        "lora_params_per_adapter": lora,
        "lora_params_read_per_step": lora * distinct_adapters,
        "bandwidth_bound_ratio": base / (base + lora * distinct_adapters),
        "flop_bound_ratio": base / (base + lora),
    }


def measure_read_bandwidth(num_bytes: int, min_seconds: float) -> float:
    """Bytes/s this process's threads read from memory: a float32 sum over `num_bytes` (make it several
    times the last-level cache, so that it streams from memory as an adapter's factors at decode do)."""
    if num_bytes < 4:
        raise ValueError(f"num_bytes must be at least one float32, got {num_bytes}")
    data = torch.ones(num_bytes // 4, dtype=torch.float32)
    return data.numel() * 4 / time_per_call_s(data.sum, min_seconds, calls_per_sample=1)


def streaming_bound_ratio(base_step_s: float, factor_bytes: float, bytes_per_s: float) -> float:
    """The best throughput ratio against the base model a step can reach if it must also read
    `factor_bytes` of adapter factors at `bytes_per_s` on top of a base step of `base_step_s`, all else
    free: base / (base + bytes / rate)."""
    if base_step_s <= 0 or bytes_per_s <= 0 or factor_bytes < 0:
        raise ValueError("base_step_s and bytes_per_s must be positive, factor_bytes not negative")
    return base_step_s / (base_step_s + factor_bytes / bytes_per_s)


def attention_flops_per_token(spec: BaseModelSpec, context_tokens: float) -> float:
    """q.k scores and the weighted sum of v over `context_tokens` keys, in every layer."""
    return 4.0 * spec.num_layers * spec.num_attention_heads * spec.head_dim * context_tokens


def roofline_fraction(tokens_per_s: float, flops_per_token: float, flops_per_s: float) -> float:
    """The share of the machine's FLOP/s a throughput of `tokens_per_s` uses."""
    if flops_per_s <= 0:
        raise ValueError(f"flops_per_s must be positive, got {flops_per_s}")
    return tokens_per_s * flops_per_token / flops_per_s


def roofline_tokens_per_s(flops_per_token: float, flops_per_s: float) -> float:
    """The throughput at which every FLOP/s of the machine would go to these tokens."""
    return flops_per_s / flops_per_token


def model_shaped_flops_per_s(shape_times_s: dict[str, float], shapes: list[LinearShape], rows: int) -> float:
    """FLOP/s of one pass through every linear on `rows` rows, given each shape's time per call: the
    total FLOPs over the total time, each shape weighted by how often a token runs it."""
    total_flops = sum(2 * rows * s.in_features * s.out_features * s.count for s in shapes)
    total_s = sum(shape_times_s[s.name] * s.count for s in shapes)
    return total_flops / total_s


def time_per_call_s(fn, min_seconds: float, calls_per_sample: int = 4) -> float:
    """Median seconds per call of `fn` over samples of `calls_per_sample` calls, sampled for at least
    `min_seconds` (and at least 5 samples) after one warm-up sample."""
    for _ in range(calls_per_sample):
        fn()
    samples = []
    started = time.perf_counter()
    while len(samples) < 5 or time.perf_counter() - started < min_seconds:
        t0 = time.perf_counter()
        for _ in range(calls_per_sample):
            fn()
        samples.append((time.perf_counter() - t0) / calls_per_sample)
    return statistics.median(samples)


def measure_gemm(
    spec: BaseModelSpec, rows: int, square_size: int, min_seconds: float, dtype: torch.dtype = torch.float32
) -> dict:
    """Sustained GEMM FLOP/s at the model's linear shapes on `rows` rows and at one square size, through
    each library at hand (torch's BLAS by `torch.matmul`, and oneDNN's inner product, which the engine's
    float32 CPU linears use): each shape's rate is the faster library's, and so is the square's."""
    shapes = model_linear_shapes(spec)
    generator = torch.Generator().manual_seed(0)
    libraries = _libraries(dtype)
    shape_times_s: dict[str, dict[str, float]] = {name: {} for name in libraries}
    for shape in shapes:
        x = torch.randn(rows, shape.in_features, generator=generator, dtype=dtype)  # (rows, in)
        w = torch.randn(shape.out_features, shape.in_features, generator=generator, dtype=dtype)  # (out, in)
        y = torch.empty(rows, shape.out_features, dtype=dtype)
        for name, matmul in libraries.items():  # x @ w.T as a linear computes it
            shape_times_s[name][shape.name] = time_per_call_s(
                lambda x=x, w=w, y=y, matmul=matmul: matmul(x, w, y), min_seconds
            )
    a = torch.randn(square_size, square_size, generator=generator, dtype=dtype)
    b = torch.randn(square_size, square_size, generator=generator, dtype=dtype)
    c = torch.empty(square_size, square_size, dtype=dtype)
    square_s = {
        name: time_per_call_s(lambda matmul=matmul: matmul(a, b, c), min_seconds, calls_per_sample=1)
        for name, matmul in libraries.items()
    }
    best_times_s = {s.name: min(times[s.name] for times in shape_times_s.values()) for s in shapes}
    model_shaped = model_shaped_flops_per_s(best_times_s, shapes, rows)
    square = 2.0 * square_size**3 / min(square_s.values())
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "rows": rows,
        "square_size": square_size,
        "min_seconds_per_shape": min_seconds,
        "shapes": [_shape_row(s, best_times_s[s.name], rows) for s in shapes],
        "model_shaped_flops_per_s": model_shaped,
        "square_flops_per_s": square,
        "roofline_flops_per_s": max(model_shaped, square),
        "roofline_source": "model-shaped" if model_shaped >= square else "square",
        "by_library": {
            name: {
                "model_shaped_flops_per_s": model_shaped_flops_per_s(shape_times_s[name], shapes, rows),
                "square_flops_per_s": 2.0 * square_size**3 / square_s[name],
            }
            for name in libraries
        },
    }


def _libraries(dtype: torch.dtype) -> dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], object]]:
    """name -> (x, w, out) computing x @ w.T: torch's BLAS always, oneDNN's where the engine would use it."""
    libraries = {"torch": lambda x, w, out: torch.matmul(x, w.t(), out=out)}
    if dense_matmul(torch.device("cpu"), dtype, reference=False)[1] == ONEDNN:
        libraries["onednn"] = lambda x, w, out: onednn_linear(x, w)
    return libraries


def _shape_row(shape: LinearShape, seconds: float, rows: int) -> dict:
    flops = 2 * rows * shape.in_features * shape.out_features
    return {**asdict(shape), "ms_per_call": seconds * 1e3, "flops_per_s": flops / seconds}
