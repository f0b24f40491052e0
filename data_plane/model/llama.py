"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3) over a paged KV cache, with LoRA slot pools.

Module and parameter names follow Hugging Face checkpoints, so weights load by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from data_plane.model.config import ModelConfig
from data_plane.model.dense import DenseLinear
from data_plane.model.lora_linear import LoRALinear
from data_plane.model.metadata import LoraSegments, PrefillSpan, StepMetadata
from data_plane.model.quant import QuantLinear, QuantSettings, make_quant_linear, quant_row_multiple
from data_plane.model.quant.base import RowSlice
from data_plane.model.quant.lora import QuantLoRALinear
from openlora_kernels.paged_attention import paged_decode_attention


@dataclass(frozen=True)
class LinearBuilder:
    """Builds the model's linears: full precision, or held in `quant.format` (the one place that knows)."""

    quant: QuantSettings = field(default_factory=QuantSettings)
    dtype: torch.dtype = torch.float32  # activations, LoRA pools and biases
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def projection(self, in_features: int, out_slices: tuple[int, ...], bias: bool) -> LoRALinear:
        """A LoRA projection of `out_slices` fused along the output (one slice: a plain projection)."""
        if not self.quant.enabled:
            return LoRALinear(in_features, out_slices, bias)
        fmt = self.quant.format
        if all(out % quant_row_multiple(fmt) == 0 for out in out_slices[:-1]):  # fused: one packed matmul
            linears = [make_quant_linear(fmt, in_features, sum(out_slices), self.device)]
        else:
            linears = [make_quant_linear(fmt, in_features, out, self.device) for out in out_slices]
        return QuantLoRALinear(linears, out_slices, bias, self.dtype)

    def lm_head(self, hidden_size: int, vocab_size: int) -> nn.Module:
        if self.quant.lm_head:
            return make_quant_linear(self.quant.format, hidden_size, vocab_size, self.device)
        return DenseLinear(hidden_size, vocab_size)


@dataclass(frozen=True)
class WeightBytes:
    """Resident base-model weights: all of them, and the decoder layers' seven linears alone."""

    total_bytes: int
    decoder_linear_bytes: int  # packed codes, scales and offsets (or full-precision weights), biases excluded
    decoder_linear_params: int

    @property
    def decoder_bits_per_weight(self) -> float:
        return 8 * self.decoder_linear_bytes / max(self.decoder_linear_params, 1)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """(head_dim / 2,) float32 inverse frequencies, with linear, llama3 or yarn scaling applied."""
    dim = config.spec.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "yarn":
        return _yarn_inv_freq(config.rope_theta, dim, scaling)
    if scaling.rope_type != "llama3":
        return inv_freq
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * torch.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(base: float, dim: int, scaling) -> torch.Tensor:
    """YaRN's frequencies as transformers computes them: each dimension's frequency interpolated (divided
    by the factor) below the correction range of the pretraining length, kept (extrapolated) above it,
    ramped linearly in between."""

    def correction_dim(rotations: float) -> float:
        length = scaling.original_max_position_embeddings
        return dim * math.log(length / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    return (1.0 / (scaling.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


class RotaryEmbedding(nn.Module):
    """Half-rotation RoPE (the Hugging Face layout) from a precomputed cos/sin table."""

    def __init__(self, config: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = config
        self.max_positions = max_positions
        self.cos: torch.Tensor | None = None  # (P, head_dim) float32
        self.sin: torch.Tensor | None = None

    def build(self, device: torch.device) -> None:
        inv_freq = rope_inv_freq(self.config).to(device)
        positions = torch.arange(self.max_positions, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)  # (P, head_dim / 2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (P, head_dim)
        self.cos, self.sin = emb.cos(), emb.sin()
        factor = self.config.rope_scaling.attention_factor
        if factor != 1.0:  # yarn: scales cos and sin in float32, as transformers does
            self.cos, self.sin = self.cos * factor, self.sin * factor

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (T, 1, head_dim) in `dtype`, for each row's position: gathered once per step and
        shared by every layer."""
        cos = self.cos[positions].unsqueeze(1).to(dtype)
        sin = self.sin[positions].unsqueeze(1).to(dtype)
        return cos, sin


def apply_rotary(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x (T, heads, head_dim) rotated by the (cos, sin) tables of `RotaryEmbedding.tables`."""
    cos, sin = rope
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    """Self-attention of one layer over the paged KV cache, causal, through the layer's sliding `window`
    when it has one (None: full attention): the query at position i attends to the keys at positions j
    with i - window < j <= i, as transformers' sliding mask does. A sequence's KV blocks wholly before
    its window stay allocated until it ends (a preemption frees and recomputes them with the rest): the
    attention only skips them."""

    def __init__(self, config: ModelConfig, linear: LinearBuilder, window: int | None) -> None:
        super().__init__()
        spec = config.spec
        self.num_heads, self.num_kv_heads, self.head_dim = (
            spec.num_attention_heads,
            spec.num_key_value_heads,
            spec.head_dim,
        )
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        # q, k and v read the same input: one fused projection (the checkpoint's q_proj, k_proj and v_proj
        # load into its slices).
        self.qkv_proj = linear.projection(spec.hidden_size, (q_out, kv_out, kv_out), config.qkv_bias)
        self.o_proj = linear.projection(q_out, (spec.hidden_size,), config.o_bias)
        # Qwen3 normalizes each head of the queries and keys (one weight over head_dim) before the rotation.
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.scale = self.head_dim**-0.5
        self.window = window
        self.k_cache: torch.Tensor | None = None  # (num_blocks, block_size, kv_heads, head_dim)
        self.v_cache: torch.Tensor | None = None

    def forward(
        self, x: torch.Tensor, meta: StepMetadata, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        num_rows = x.shape[0]
        qkv = self.qkv_proj(x, meta.lora)  # (T, (heads + 2 * kv_heads) * head_dim)
        q, k, v = qkv.split(self.qkv_proj.out_slices, dim=-1)  # column views
        q = q.view(num_rows, self.num_heads, self.head_dim)
        k = k.view(num_rows, self.num_kv_heads, self.head_dim)
        v = v.view(num_rows, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        k_cache, v_cache = self.k_cache, self.v_cache
        if meta.native_kv is not None:  # the same floats in one call: q and k rotated in place
            meta.native_kv.rope_kv_write(q, k, v, rope, k_cache, v_cache)
        else:
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)
            k_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, meta.kv_slot_ids, k)
            v_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, meta.kv_slot_ids, v)

        out = torch.empty_like(q)  # (T, heads, head_dim)
        for span in meta.prefills:
            rows = slice(span.start, span.start + span.num_tokens)
            q_span = q[rows].transpose(0, 1)  # (heads, n, head_dim)
            k_span, v_span, mask = self._prefill_keys(span, k[rows], v[rows])
            o = F.scaled_dot_product_attention(
                q_span,
                k_span.transpose(0, 1),
                v_span.transpose(0, 1),
                attn_mask=mask,
                is_causal=mask is None,
                scale=self.scale,
                enable_gqa=True,
            )  # (heads, n, head_dim)
            out[rows] = o.transpose(0, 1)
        if meta.native_decode is not None:  # the CPU's native kernel, over the step's checked tables
            q_decode = q[meta.decode_rows]  # (D, heads, head_dim)
            out[meta.decode_rows] = meta.native_decode.attend(
                q_decode, k_cache, v_cache, self.scale, self.window
            )
        elif meta.decode_rows is not None:
            # One query per sequence against its cached history, read through the block tables.
            out[meta.decode_rows] = paged_decode_attention(
                q[meta.decode_rows],  # (D, heads, head_dim)
                k_cache,
                v_cache,
                meta.decode_block_tables,  # (D, max_blocks)
                meta.decode_context_lens,
                self.scale,
                use_triton=meta.use_triton,
                max_context_len=meta.max_decode_context_len,
                window=self.window,
            )  # (D, heads, head_dim)
        return self.o_proj(out.view(num_rows, -1), meta.lora)

    def _prefill_keys(
        self, span: PrefillSpan, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The keys and values a prefill span attends to, (context, kv_heads, head_dim) each, and its mask
        (n, context), None for plain causal attention; `k`, `v` (n, kv_heads, head_dim) are the span's own.
        """
        window = self.window
        if span.num_cached == 0:
            if window is None or span.num_tokens <= window:
                return k, v, None
            first_key = 0
        else:
            # A later chunk (or a recompute) attends to the cached prefix as well as to itself: with a
            # window, from the block of the first query's earliest key on.
            block_size = self.k_cache.shape[1]
            earliest = 0 if window is None else max(0, span.num_cached + 1 - window)
            first_block = earliest // block_size
            first_key = first_block * block_size
            context = span.num_cached + span.num_tokens - first_key
            blocks = span.block_ids[first_block:]
            k = self.k_cache[blocks].view(-1, self.num_kv_heads, self.head_dim)[:context]
            v = self.v_cache[blocks].view(-1, self.num_kv_heads, self.head_dim)[:context]
        key_pos = first_key + torch.arange(k.shape[0], device=k.device)
        query_pos = span.num_cached + torch.arange(span.num_tokens, device=k.device)
        mask = key_pos.unsqueeze(0) <= query_pos.unsqueeze(1)  # (n, context)
        if window is not None:
            mask &= key_pos.unsqueeze(0) > query_pos.unsqueeze(1) - window
        return k, v, mask


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, linear: LinearBuilder) -> None:
        super().__init__()
        hidden, inter = config.spec.hidden_size, config.spec.intermediate_size
        self.gate_up_proj = linear.projection(hidden, (inter, inter), config.mlp_bias)  # gate_proj | up_proj
        self.down_proj = linear.projection(inter, (hidden,), config.mlp_bias)

    def forward(self, x: torch.Tensor, lora: LoraSegments | None) -> torch.Tensor:
        gate, up = self.gate_up_proj(x, lora).chunk(2, dim=-1)  # (T, inter) each
        return self.down_proj(F.silu(gate) * up, lora)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, linear: LinearBuilder, window: int | None) -> None:
        super().__init__()
        hidden = config.spec.hidden_size
        self.input_layernorm = RMSNorm(hidden, config.rms_norm_eps)
        self.self_attn = Attention(config, linear, window)
        self.post_attention_layernorm = RMSNorm(hidden, config.rms_norm_eps)
        self.mlp = MLP(config, linear)

    def forward(
        self, h: torch.Tensor, meta: StepMetadata, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), meta, rope)
        return h + self.mlp(self.post_attention_layernorm(h), meta.lora)


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int, linear: LinearBuilder) -> None:
        super().__init__()
        spec = config.spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.rotary = RotaryEmbedding(config, max_positions)
        self.layers = nn.ModuleList(DecoderLayer(config, linear, window) for window in config.layer_windows)
        self.norm = RMSNorm(spec.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """forward(input_ids (T,), meta) -> hidden (T, hidden); compute_logits(hidden (N, hidden)) -> (N, vocab).

    `linear` decides how the linears hold their weights (full precision by default, or quantized).
    `between_layers`, when set, runs after each decoder layer of a forward pass (the engine takes requests
    that arrived during a step there, so that their adapter copies overlap the rest of it)."""

    def __init__(self, config: ModelConfig, max_positions: int, linear: LinearBuilder | None = None) -> None:
        super().__init__()
        linear = linear or LinearBuilder()
        self.config = config
        self.between_layers: Callable[[], None] | None = None
        self.quant = linear.quant
        self.model = LlamaModel(config, max_positions, linear)
        self.lm_head = linear.lm_head(config.spec.hidden_size, config.spec.vocab_size)
        for layer in range(len(self.model.layers)):
            for name, (module, _) in self.lora_targets(layer).items():
                module.slice_targets = (*module.slice_targets, name)  # lora_targets lists slices in order

    def quantized_weights(self) -> dict[str, QuantLinear | RowSlice]:
        """Checkpoint tensor name -> the QuantLinear (or rows of a fused one) that takes that weight (empty
        in full precision)."""
        targets = {}
        for layer in range(len(self.model.layers)):
            for name, (module, index) in self.lora_targets(layer).items():
                if isinstance(module, QuantLoRALinear):
                    targets[f"{_checkpoint_prefix(layer, name)}.weight"] = module.quants[index]
        if isinstance(self.lm_head, QuantLinear):
            targets["lm_head.weight"] = self.lm_head
        return targets

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Checkpoint tensor name -> the full-precision tensor it is copied into: a fused projection's
        q_proj/k_proj/v_proj (gate_proj/up_proj) weights and biases are row slices of its own (views)."""
        tensors = {}
        fused = set()
        for layer in range(len(self.model.layers)):
            for name, (module, index) in self.lora_targets(layer).items():
                fused.add(module)
                start, end = module.slice_bounds[index]
                prefix = _checkpoint_prefix(layer, name)
                if not isinstance(module, QuantLoRALinear):
                    tensors[f"{prefix}.weight"] = module.weight[start:end]
                if module.bias is not None:
                    tensors[f"{prefix}.bias"] = module.bias[start:end]
        fused_names = {name for name, module in self.named_modules() if module in fused}
        for name, param in self.named_parameters():
            if name.rsplit(".", 1)[0] not in fused_names:
                tensors[name] = param
        return tensors

    def weight_bytes(self) -> WeightBytes:
        """Resident weight bytes (parameters and buffers; LoRA pools and KV cache are not weights)."""

        def nbytes(module: nn.Module) -> int:
            tensors = [*module.parameters(), *module.buffers()]
            return sum(t.numel() * t.element_size() for t in tensors)

        linear_bytes = linear_params = 0
        for layer in range(len(self.model.layers)):
            for proj in self.projections(layer).values():
                linear_bytes += nbytes(proj) - _bias_bytes(proj)
                linear_params += proj.in_features * proj.out_features
        # parameters() yields a tied lm_head/embedding tensor once.
        return WeightBytes(nbytes(self), linear_bytes, linear_params)

    def projections(self, layer: int) -> dict[str, LoRALinear]:
        """The LoRA projections of one layer by module name: qkv_proj and gate_up_proj are fused."""
        block = self.model.layers[layer]
        attn, mlp = block.self_attn, block.mlp
        return {
            "qkv_proj": attn.qkv_proj,
            "o_proj": attn.o_proj,
            "gate_up_proj": mlp.gate_up_proj,
            "down_proj": mlp.down_proj,
        }

    def lora_targets(self, layer: int) -> dict[str, tuple[LoRALinear, int]]:
        """The seven LoRA-capable projections of one layer, by PEFT target-module name: (the projection
        that holds it, its slice index there)."""
        block = self.model.layers[layer]
        attn, mlp = block.self_attn, block.mlp
        return {
            "q_proj": (attn.qkv_proj, 0),
            "k_proj": (attn.qkv_proj, 1),
            "v_proj": (attn.qkv_proj, 2),
            "o_proj": (attn.o_proj, 0),
            "gate_proj": (mlp.gate_up_proj, 0),
            "up_proj": (mlp.gate_up_proj, 1),
            "down_proj": (mlp.down_proj, 0),
        }

    def allocate_lora_slots(self, num_slots: int, max_rank: int) -> None:
        for layer in range(len(self.model.layers)):
            for proj in self.projections(layer).values():
                proj.allocate_slots(num_slots, max_rank)

    def forward(self, input_ids: torch.Tensor, meta: StepMetadata) -> torch.Tensor:
        h = self.model.embed_tokens(input_ids)  # (T, hidden)
        rope = self.model.rotary.tables(meta.positions, h.dtype)
        between_layers = self.between_layers
        for layer in self.model.layers:
            h = layer(h, meta, rope)
            if between_layers is not None:
                between_layers()
        return self.model.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # (N, vocab)


def _checkpoint_prefix(layer: int, projection: str) -> str:
    """The Hugging Face module name of a layer's projection (`projection` a PEFT target-module name)."""
    parent = "self_attn" if projection in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"model.layers.{layer}.{parent}.{projection}"


def _bias_bytes(proj: LoRALinear) -> int:
    bias = proj.bias
    return 0 if bias is None else bias.numel() * bias.element_size()
