"""Loading a Hugging Face safetensors checkpoint into LlamaForCausalLM, one tensor at a time."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import torch

from data_plane.model.config import ModelConfig
from data_plane.model.dense import dense_matmul, use_dense_matmul
from data_plane.model.llama import LinearBuilder, LlamaForCausalLM
from data_plane.model.quant import (
    QuantLinear,
    QuantSettings,
    check_device,
    check_shapes,
    reference_kernels_requested,
    set_reference_kernels,
)
from data_plane.model.shard_reader import ShardError, iter_tensors, read_entries
from openlora.safe_json import JsonFieldError, describe, load_json_object

log = logging.getLogger(__name__)

_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_MAX_INDEX_BYTES = 64 << 20
# A shard named by the index: a file of the checkpoint directory, never a path out of it.
_SHARD_NAME = re.compile(r"[A-Za-z0-9_.-]{1,255}\.safetensors", re.ASCII)


class CheckpointError(ValueError):
    """The checkpoint directory is incomplete or does not match its config."""


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint, chosen as transformers chooses them: `model.safetensors` when
    there is one, else the shards its index names. Other `*.safetensors` files of the directory (an older
    copy, another format's export) are never read: they would overwrite tensors of the checkpoint."""
    single = model_dir / _SINGLE_FILE
    if single.is_file():
        return [single]
    index = model_dir / _INDEX_FILE
    if index.is_file():
        return [model_dir / name for name in _indexed_shards(index)]
    others = sorted(p.name for p in model_dir.glob("*.safetensors"))
    pickles = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt"))
    if others:
        hint = f" (found {others[0]}: name a single file {_SINGLE_FILE}, or list the shards in {_INDEX_FILE})"
    elif pickles:
        hint = f" (found {pickles[0]}: pickle checkpoints are refused, convert to safetensors)"
    else:
        hint = ""
    raise CheckpointError(f"{model_dir}: no {_SINGLE_FILE} or {_INDEX_FILE}{hint}")


def _indexed_shards(index: Path) -> list[str]:
    """Shard file names of an index's `weight_map`: plain `*.safetensors` names inside the directory."""
    try:
        weight_map = load_json_object(index.read_bytes(), _INDEX_FILE, max_bytes=_MAX_INDEX_BYTES).get_object(
            "weight_map"
        )
    except JsonFieldError as e:
        raise CheckpointError(str(e)) from None
    for name in weight_map.data.values():
        if not isinstance(name, str) or not _SHARD_NAME.fullmatch(name):
            raise CheckpointError(
                f"{_INDEX_FILE}.weight_map: shard {describe(name)} is not a *.safetensors file name"
            )
    names = sorted(set(weight_map.data.values()))
    if not names:
        raise CheckpointError(f"{_INDEX_FILE}.weight_map: names no shard")
    return names


def _load_shard(
    path: Path,
    params: dict[str, torch.Tensor],
    quantized: dict[str, QuantLinear],
    config: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    missing: set[str],
    aliases: dict[str, str],
) -> int:
    """Copies one shard's tensors into `params` (checkpoint name -> the model tensor, or slice of a fused
    one, it fills), or quantizes them into `quantized` (removing their names from `missing`); a stored
    name in `aliases` fills the tensor it maps to; returns bytes read. Tensors are read one at a time
    (`iter_tensors`, no mmap), so a full-precision weight lives only while it is copied or quantized."""
    loaded_bytes = 0
    for stored_name, tensor in iter_tensors(path):
        if stored_name.endswith(_IGNORED_SUFFIXES):
            continue
        name = aliases.get(stored_name) or _model_name(stored_name, params, quantized)
        if name not in missing and (name in params or name in quantized):
            copy = describe(name) if stored_name == name else f"{describe(name)} (as {describe(stored_name)})"
            raise CheckpointError(f"{path.name}: {copy} is stored twice in the checkpoint")
        if name in quantized:
            try:
                quantized[name].load_weight(tensor)
            except ValueError as e:
                raise CheckpointError(f"{path.name}: {stored_name}: {e}") from None
        elif name in params:
            target = params[name]
            if tuple(tensor.shape) != tuple(target.shape):
                raise CheckpointError(
                    f"{path.name}: {stored_name} has shape {list(tensor.shape)}, expected {list(target.shape)}"
                )
            with torch.no_grad():
                target.copy_(tensor.to(device=device, dtype=dtype))
        else:
            raise CheckpointError(
                f"{path.name}: unexpected tensor {describe(stored_name)}: {config.spec.architecture} as config.json "
                "describes it has no such weight"
            )
        loaded_bytes += tensor.numel() * tensor.element_size()
        missing.discard(name)
        del tensor
    return loaded_bytes


def _model_name(name: str, params: dict, quantized: dict) -> str:
    """The model tensor a checkpoint name fills, by transformers' rule for the base model's prefix: a
    checkpoint saved from the base model alone (`LlamaModel`, or converted by a tool that drops the
    prefix) names its tensors `embed_tokens.weight`, `layers.0.self_attn.q_proj.weight`, `norm.weight`; a
    name the model lacks whose `model.`-prefixed form it has is read as that (`lm_head.weight`, outside
    the base model, keeps its name)."""
    if name in params or name in quantized:
        return name
    prefixed = f"model.{name}"
    return prefixed if prefixed in params or prefixed in quantized else name


def load_model(
    model_dir: Path,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    quant: QuantSettings | None = None,
) -> tuple[LlamaForCausalLM, ModelConfig]:
    """Builds the model on `device` and streams its weights in; returns (model, config).

    With `quant`, the linears it names are quantized tensor by tensor as they are read: the full-precision
    model is never held (peak memory: the quantized model plus about twice the largest tensor). A format
    the device cannot run, or a linear it cannot pack, is refused (QuantizationError) before anything is
    read. The quantized linears run their packed kernels, or their references under
    OPENLORA_KERNELS=reference (read here, once); the full-precision ones the matmul `dense.dense_matmul`
    chooses for the device and dtype (oneDNN's for float32 on the CPU, `F.linear` under reference)."""
    quant = quant or QuantSettings()
    check_device(quant, device)
    model_dir = Path(model_dir)
    config = ModelConfig.from_dir(model_dir)
    check_shapes(quant, config.spec)
    files = checkpoint_files(model_dir)
    with torch.device("meta"):
        model = LlamaForCausalLM(config, max_positions, LinearBuilder(quant, dtype, torch.device(device)))
    model.to_empty(device=device)
    model.to(dtype)
    reference = reference_kernels_requested()
    set_reference_kernels(model, reference)
    matmul, matmul_name = dense_matmul(torch.device(device), dtype, reference)
    use_dense_matmul(model, matmul)
    params = model.checkpoint_tensors()
    quantized = model.quantized_weights()
    tied_head = None
    stored = _stored_names(files)
    # A checkpoint whose config ties the head to the embedding but that stores an lm_head of its own is
    # loaded as transformers loads it: the stored head is read, and tied only if it equals the embedding.
    # One that stores the head and no embedding is tied the other way, as transformers ties it: the
    # stored head is read as the embedding.
    head_as_embedding = (
        config.tie_word_embeddings
        and "lm_head.weight" in stored
        and not stored & {"model.embed_tokens.weight", "embed_tokens.weight"}
    )
    aliases = {"lm_head.weight": "model.embed_tokens.weight"} if head_as_embedding else {}
    tied = config.tie_word_embeddings and ("lm_head.weight" not in stored or head_as_embedding)
    if tied:
        params.pop("lm_head.weight", None)
        tied_head = quantized.pop("lm_head.weight", None)
    missing = set(params) | set(quantized)
    started = time.monotonic()
    loaded_bytes = 0
    for shard_index, path in enumerate(files, start=1):
        try:
            loaded_bytes += _load_shard(path, params, quantized, config, device, dtype, missing, aliases)
        except (ShardError, OSError) as e:
            raise CheckpointError(f"{path.name}: cannot be loaded: {str(e)[:200]}") from None
        log.info(
            "loaded shard %d/%d (%s): %.1f MiB so far, %.1f s",
            shard_index,
            len(files),
            path.name,
            loaded_bytes / 2**20,
            time.monotonic() - started,
        )
    if missing:
        raise CheckpointError(f"{model_dir}: tensors missing from the checkpoint: {sorted(missing)[:5]}")
    if tied_head is not None:
        tied_head.load_weight(model.model.embed_tokens.weight)
    elif tied or (config.tie_word_embeddings and _same_weight(model.lm_head, model.model.embed_tokens)):
        model.lm_head.weight = model.model.embed_tokens.weight  # one tensor, not two copies
    if quant.enabled:
        weights = model.weight_bytes()
        kernels = sorted(
            {m.kernel_name for m in model.modules() if isinstance(getattr(m, "kernel_name", None), str)}
        )
        log.info(
            "base weights quantized to %s%s: decoder linears %.2f bits per weight, %.1f MiB resident in all%s",
            quant.format,
            " (lm_head too)" if quant.lm_head else "",
            weights.decoder_bits_per_weight,
            weights.total_bytes / 2**20,
            f"; kernel {', '.join(kernels)}" if kernels else "",
        )
    log.info("full-precision linears: %s matmul", matmul_name)
    model.model.rotary.build(device)
    model.eval()
    return model, config


def _stored_names(files: list[Path]) -> set[str]:
    """The names of the tensors the shards hold (from the headers alone); a shard that cannot be read is
    named, as the load names it."""
    names: set[str] = set()
    for path in files:
        try:
            names.update(entry.name for entry in read_entries(path)[0])
        except (ShardError, OSError) as e:
            raise CheckpointError(f"{path.name}: cannot be loaded: {str(e)[:200]}") from None
    return names


def _same_weight(head: torch.nn.Module, embedding: torch.nn.Module) -> bool:
    weight = getattr(head, "weight", None)
    return isinstance(weight, torch.Tensor) and torch.equal(weight, embedding.weight)
