"""Engine decode throughput on the CPU: 32 concurrent requests on 32 distinct adapters vs no adapter.

A ~50M-parameter Llama (hidden 512, 6 layers, vocab 32000, random weights written by transformers) and
32 rank-16 adapters on all seven projections (PEFT layout). Each round runs 32 requests at once, every
one on its own adapter ("multi") or all on the base model ("base"); throughput counts the tokens of
steps where all 32 decode. Rounds alternate and the best of each is kept, because this machine is
shared. Target: multi >= 0.8 x base.

    python -m benchmarks.engine_bench [--rounds 2] [--decode-tokens 48]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from data_plane.engine.config import EngineConfig
from data_plane.engine.llm_engine import LLMEngine
from data_plane.engine.request import AdapterRef, EngineRequest, SamplingOptions
from openlora.artifact import digest_dir

NUM_REQUESTS = 32
RANK = 16
PROMPT_TOKENS = 32
RESULTS_PATH = Path(__file__).parent / "results" / "engine_bench.json"
TARGET_RATIO = 0.8


def write_model(root: Path) -> tuple[Path, list[Path]]:
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=2048,
    )
    model = LlamaForCausalLM(config)
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=32, target_modules=targets))
    template = root / "template"
    peft_model.save_pretrained(template)
    shapes = {
        name.replace(".default", ""): tuple(p.shape)
        for name, p in peft_model.named_parameters()
        if "lora_" in name
    }
    adapter_dirs = []
    for i in range(NUM_REQUESTS):
        adapter_dir = root / f"adapter{i:02d}"
        adapter_dir.mkdir()
        (adapter_dir / "adapter_config.json").write_text((template / "adapter_config.json").read_text())
        tensors = {name: torch.randn(shape) * 0.02 for name, shape in shapes.items()}
        save_file(tensors, str(adapter_dir / "adapter_model.safetensors"))
        adapter_dirs.append(adapter_dir)
    return model_dir, adapter_dirs


def run_round(engine: LLMEngine, adapters: list[AdapterRef] | None, decode_tokens: int, tag: str) -> dict:
    """32 requests at once; returns decode tokens/s over the steps where all of them decode."""
    for i in range(NUM_REQUESTS):
        prompt = [(7 * i + j) % 31000 + 100 for j in range(PROMPT_TOKENS)]
        engine.add_request(
            EngineRequest(
                f"{tag}-{i}",
                prompt,
                SamplingOptions(max_tokens=decode_tokens),
                (adapters[i],) if adapters else (),
            )
        )
    decode_s, decode_tokens_done = 0.0, 0
    while engine.has_unfinished():
        all_decoding = engine.num_running == NUM_REQUESTS and all(
            s.num_pending_tokens == 1 for s in engine.scheduler.running
        )
        started = time.perf_counter()
        outputs = engine.step()
        elapsed = time.perf_counter() - started
        if all_decoding:
            decode_s += elapsed
            decode_tokens_done += sum(len(o.new_token_ids) for o in outputs)
    rate = decode_tokens_done / decode_s if decode_s else 0.0
    return {"decode_tokens": decode_tokens_done, "decode_s": decode_s, "tokens_per_s": rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--decode-tokens", type=int, default=48)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        model_dir, adapter_dirs = write_model(root)
        print(f"wrote the model and {len(adapter_dirs)} adapters in {time.perf_counter() - started:.1f} s")
        engine = LLMEngine(
            EngineConfig(
                model_dir=model_dir,
                dtype="float32",
                num_adapter_slots=NUM_REQUESTS,
                max_num_seqs=NUM_REQUESTS,
                max_num_batched_tokens=2048,
                kv_cache_bytes=512 << 20,
                max_lora_rank=RANK,
            )
        )
        adapters = [AdapterRef(digest_dir(d), d) for d in adapter_dirs]
        run_round(engine, adapters, 2, "warmup-multi")  # loads every adapter into its slot
        run_round(engine, None, 2, "warmup-base")
        base, multi = [], []
        for r in range(args.rounds):
            base.append(run_round(engine, None, args.decode_tokens, f"base{r}"))
            multi.append(run_round(engine, adapters, args.decode_tokens, f"multi{r}"))
        engine.shutdown()
    best_base = max(x["tokens_per_s"] for x in base)
    best_multi = max(x["tokens_per_s"] for x in multi)
    ratio = best_multi / best_base
    result = {
        "benchmark": "engine_bench",
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "torch_threads": torch.get_num_threads(),
        "model": "llama hidden 512, 6 layers, vocab 32000, fp32",
        "requests": NUM_REQUESTS,
        "adapter_rank": RANK,
        "decode_tokens_per_request": args.decode_tokens,
        "base_tokens_per_s": best_base,
        "multi_adapter_tokens_per_s": best_multi,
        "ratio": ratio,
        "target_ratio": TARGET_RATIO,
        "rounds": {"base": base, "multi": multi},
    }
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(json.dumps(result, indent=2))
    print(f"{'case':<28}{'decode tok/s':>14}")
    print(f"{'no adapter':<28}{best_base:>14.1f}")
    print(f"{'32 distinct adapters (r16)':<28}{best_multi:>14.1f}")
    print(f"ratio multi/base: {ratio:.3f} (target >= {TARGET_RATIO})")
    print(f"wrote {RESULTS_PATH}")


if __name__ == "__main__":
    main()
