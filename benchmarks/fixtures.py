"""Benchmark fixtures built on demand and cached: a random-weight Llama and many PEFT LoRA adapters for it.

The base model is written by `transformers` (`save_pretrained`, safetensors) with a word-level
`tokenizer.json` (the benchmarks send `prompt_token_ids`, so the tokenizer only has to exist and decode).
The row of the end-of-sequence token in `lm_head` is zeroed: its logit is then always 0 while the largest
of the other 31,999 random logits is positive, so greedy decoding never stops early and every system does
the same number of decode steps.

Adapter 0 is written by `peft` (`get_peft_model(...).save_pretrained`); the others copy its
`adapter_config.json` and tensor layout with fresh random values (deterministic per index), which is fast
enough to write a thousand of them.

    python -m benchmarks.fixtures --num-adapters 100
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks.trace import adapter_name

FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BOS_TOKEN_ID, EOS_TOKEN_ID, UNK_TOKEN_ID = 1, 2, 0


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int = 2048
    # Data type of the saved weights ("float32" or "bfloat16").
    dtype: str = "float32"

    @property
    def num_parameters(self) -> int:
        head_dim = self.hidden_size // self.num_attention_heads
        kv = self.num_key_value_heads * head_dim
        attention = 2 * self.hidden_size * self.hidden_size + 2 * self.hidden_size * kv
        mlp = 3 * self.hidden_size * self.intermediate_size
        norms = 2 * self.hidden_size
        return (
            self.num_layers * (attention + mlp + norms)
            + 2 * self.vocab_size * self.hidden_size
            + self.hidden_size
        )


# ~52M parameters: the CPU benchmark model of the issues.
LLAMA_50M = ModelShape("bench-llama-50m", 512, 6, 1376, 8, 8, 32000)
# ~1.1B parameters (TinyLlama's shape) in bf16: the GPU end-to-end model.
LLAMA_1B = ModelShape("bench-llama-1b", 2048, 22, 5632, 32, 4, 32000, dtype="bfloat16")
SHAPES = {shape.name: shape for shape in (LLAMA_50M, LLAMA_1B)}


@dataclass(frozen=True)
class AdapterSpec:
    rank: int = 16
    lora_alpha: int = 32
    # Data type of the saved adapter tensors ("float16", "bfloat16" or "float32").
    dtype: str = "float16"
    target_modules: tuple[str, ...] = ALL_PROJECTIONS


def model_dir(shape: ModelShape, root: Path = FIXTURES_DIR) -> Path:
    return root / shape.name


def adapters_root(shape: ModelShape, spec: AdapterSpec, root: Path = FIXTURES_DIR) -> Path:
    targets = "" if set(spec.target_modules) == set(ALL_PROJECTIONS) else "-" + "-".join(spec.target_modules)
    return model_dir(shape, root) / f"adapters-r{spec.rank}-{spec.dtype}{targets}"


def adapter_dir(shape: ModelShape, spec: AdapterSpec, index: int, root: Path = FIXTURES_DIR) -> Path:
    return adapters_root(shape, spec, root) / adapter_name(index)


def ensure_model(shape: ModelShape = LLAMA_50M, root: Path = FIXTURES_DIR, seed: int = 0) -> Path:
    """Writes the base model unless an identical one is cached; returns its directory."""
    out = model_dir(shape, root)
    stamp = out / "fixture.json"
    wanted = {"shape": asdict(shape), "seed": seed}
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_layers,
        intermediate_size=shape.intermediate_size,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        vocab_size=shape.vocab_size,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=UNK_TOKEN_ID,
    )
    dtype = getattr(torch, shape.dtype)
    torch.set_default_dtype(dtype)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        # (vocab, hidden): the EOS logit is always 0, below the maximum of the other random logits.
        model.lm_head.weight[EOS_TOKEN_ID].zero_()
    model.save_pretrained(out, safe_serialization=True)
    write_tokenizer(out / "tokenizer.json", shape.vocab_size)
    stamp.write_text(json.dumps(wanted))
    return out


def write_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer over `vocab_size` made-up words (w16, w17, ...) and three special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": UNK_TOKEN_ID, "<s>": BOS_TOKEN_ID, "</s>": EOS_TOKEN_ID}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    tokenizer.save(str(path))
    (path.parent / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"})
    )


def ensure_adapters(
    num_adapters: int,
    shape: ModelShape = LLAMA_50M,
    spec: AdapterSpec = AdapterSpec(),
    root: Path = FIXTURES_DIR,
) -> list[Path]:
    """Adapter directories 0..num_adapters-1 (writing the missing ones); index i is named adapter_name(i)."""
    base = ensure_model(shape, root)
    dirs = [adapter_dir(shape, spec, i, root) for i in range(num_adapters)]
    if num_adapters == 0:
        return dirs
    if not _complete(dirs[0]):
        _write_with_peft(base, dirs[0], spec)
    template = _read_layout(dirs[0])
    pool = None
    for index, out in enumerate(dirs[1:], start=1):
        if not _complete(out):
            pool = _random_pool() if pool is None else pool
            _write_clone(dirs[0], out, template, spec, seed=index, pool=pool)
    return dirs


def ensure_small_adapters(
    num_adapters: int, shape: ModelShape = LLAMA_50M, rank: int = 4, root: Path = FIXTURES_DIR
) -> list[Path]:
    """Small distinct adapters (rank `rank` on q_proj and v_proj, float16) for registry-scale runs where
    most adapters are registered but never requested; index i is named adapter_name(i, "small-")."""
    import torch
    from safetensors.torch import save_file

    ensure_model(shape, root)
    template = ensure_adapters(1, shape, root=root)[0]
    out_root = model_dir(shape, root) / f"small-adapters-r{rank}"
    config = json.loads((template / "adapter_config.json").read_text())
    config.update(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"])
    head_dim = shape.hidden_size // shape.num_attention_heads
    out_features = {"q_proj": shape.hidden_size, "v_proj": shape.num_key_value_heads * head_dim}
    dirs = []
    for index in range(num_adapters):
        out = out_root / adapter_name(index, "small-")
        dirs.append(out)
        if _complete(out):
            continue
        rng = np.random.default_rng(10_000_000 + index)
        tensors = {}
        for layer in range(shape.num_layers):
            for module, features in out_features.items():
                prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
                a = rng.normal(0.0, 0.02, size=(rank, shape.hidden_size)).astype(np.float32)  # (rank, in)
                b = rng.normal(0.0, 0.02, size=(features, rank)).astype(np.float32)  # (out, rank)
                tensors[f"{prefix}.lora_A.weight"] = torch.from_numpy(a).half()
                tensors[f"{prefix}.lora_B.weight"] = torch.from_numpy(b).half()
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        save_file(tensors, tmp / "adapter_model.safetensors")
        tmp.rename(out)
    return dirs


def _complete(directory: Path) -> bool:
    return all((directory / name).exists() for name in ADAPTER_FILES)


def _write_with_peft(base: Path, out: Path, spec: AdapterSpec) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.lora_alpha,
        target_modules=list(spec.target_modules),
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    get_peft_model(model, config).save_pretrained(tmp)
    # peft saves in the model's dtype; store the adapter in the fixture dtype like the clones.
    weights_path = tmp / "adapter_model.safetensors"
    tensors = load_file(weights_path)
    save_file({k: v.to(getattr(torch, spec.dtype)).contiguous() for k, v in tensors.items()}, weights_path)
    for extra in tmp.iterdir():
        if extra.name not in ADAPTER_FILES:
            extra.unlink()
    # Name the base model by its fixture name rather than by where it happened to be written.
    config_path = tmp / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    adapter_config["base_model_name_or_path"] = base.name
    config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def _read_layout(directory: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(directory / "adapter_model.safetensors", framework="numpy") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118


_POOL_SIZE = 1 << 24  # 16M float32 values (64 MiB) shared by every clone


def _random_pool() -> np.ndarray:
    return np.random.default_rng(0).standard_normal(_POOL_SIZE, dtype=np.float32)


def _write_clone(
    template_dir: Path,
    out: Path,
    layout: dict[str, tuple[int, ...]],
    spec: AdapterSpec,
    seed: int,
    pool: np.ndarray,
) -> None:
    """Same tensor names and shapes as the template, fresh values: each tensor is a window of a shared
    normal pool at a random offset (distinct per adapter, and much faster than drawing every value),
    scaled like PEFT's init: A (rank, in) by 1/sqrt(in), B (out, rank) by 0.02."""
    import torch
    from safetensors.torch import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in layout.items():
        count = int(np.prod(shape))
        offset = int(rng.integers(0, _POOL_SIZE - count))
        scale = 1.0 / np.sqrt(shape[1]) if ".lora_A." in name else 0.02
        values = pool[offset : offset + count].reshape(shape) * np.float32(scale)
        tensors[name] = torch.from_numpy(values).to(getattr(torch, spec.dtype))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copyfile(template_dir / "adapter_config.json", tmp / "adapter_config.json")
    save_file(tensors, tmp / "adapter_model.safetensors")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(SHAPES), default=LLAMA_50M.name)
    parser.add_argument("--num-adapters", type=int, default=100)
    parser.add_argument("--root", type=Path, default=FIXTURES_DIR)
    args = parser.parse_args(argv)
    shape = SHAPES[args.model]
    started = time.perf_counter()
    base = ensure_model(shape, args.root)
    dirs = ensure_adapters(args.num_adapters, shape, root=args.root)
    print(
        f"{shape.name} ({shape.num_parameters / 1e6:.1f}M parameters) at {base}; "
        f"{len(dirs)} adapters; {time.perf_counter() - started:.1f} s"
    )


if __name__ == "__main__":
    main()
