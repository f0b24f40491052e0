"""The loader quantizes tensor by tensor as it reads: peak RSS, measured by the loading process itself,
stays under the quantized model + 2x the largest tensor + a fixed overhead, for a checkpoint several
times larger than that bound in full precision."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

HIDDEN, INTERMEDIATE, NUM_LAYERS, VOCAB = 1024, 4096, 8, 256
OVERHEAD_BYTES = 64 << 20  # allocator slack and small tensors

_PROBE = r"""
import json, sys
import psutil, torch
from data_plane.model.loader import load_model
from data_plane.model.quant import QuantSettings

torch.set_num_threads(1)
# Load a tiny model of the same layout first: the code pages of every path it runs (torch's libraries are
# hundreds of MiB) count in RSS too, and they are not what this test measures.
quant = QuantSettings(sys.argv[3])
warm, _ = load_model(sys.argv[1], torch.float32, torch.device("cpu"), 16, quant=quant)
del warm
baseline = psutil.Process().memory_info().rss
model, _ = load_model(sys.argv[2], torch.float32, torch.device("cpu"), 16, quant=quant)
# VmHWM: this address space's peak RSS. (ru_maxrss would not do: Linux carries it across exec, so it
# can report the pytest parent's size at fork.)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
peak = int(status["VmHWM"].split()[0]) * 1024
print(json.dumps({"baseline": baseline, "peak": peak, "weights": model.weight_bytes().total_bytes}))
"""


def _write_checkpoint(
    model_dir: Path, hidden: int = HIDDEN, intermediate: int = INTERMEDIATE, vocab: int = VOCAB
) -> tuple[int, int]:
    """A random Llama checkpoint in two shards with an index; returns (fp32 bytes, largest tensor bytes)."""
    model_dir.mkdir()
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "vocab_size": vocab,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    (model_dir / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g) * 0.02

    shapes = {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (hidden, hidden),
        "self_attn.v_proj": (hidden, hidden),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (intermediate, hidden),
        "mlp.up_proj": (intermediate, hidden),
        "mlp.down_proj": (hidden, intermediate),
    }
    weight_map: dict[str, str] = {}
    total = 0
    half = NUM_LAYERS // 2
    for shard, layers in enumerate((range(half), range(half, NUM_LAYERS))):
        name = f"model-0000{shard + 1}-of-00002.safetensors"
        tensors = {}
        if shard == 0:
            tensors["model.embed_tokens.weight"] = randn(vocab, hidden)
        else:
            tensors["model.norm.weight"] = torch.ones(hidden)
            tensors["lm_head.weight"] = randn(vocab, hidden)
        for layer in layers:
            prefix = f"model.layers.{layer}."
            tensors[prefix + "input_layernorm.weight"] = torch.ones(hidden)
            tensors[prefix + "post_attention_layernorm.weight"] = torch.ones(hidden)
            for module, shape in shapes.items():
                tensors[prefix + module + ".weight"] = randn(*shape)
        save_file(tensors, model_dir / name)
        total += sum(t.numel() * 4 for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    return total, intermediate * hidden * 4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path, int, int]:
    """(tiny checkpoint, large checkpoint, the large one's fp32 bytes, its largest tensor's bytes)."""
    root = tmp_path_factory.mktemp("streaming")
    _write_checkpoint(root / "tiny", hidden=128, intermediate=512)
    total, largest = _write_checkpoint(root / "large")
    return root / "tiny", root / "large", total, largest


@pytest.mark.parametrize(("fmt", "times"), [("int4", 3), ("int8", 2)])
def test_peak_rss_while_quantizing_stays_under_the_streaming_bound(checkpoints, fmt, times):
    tiny_dir, model_dir, fp32_bytes, largest_bytes = checkpoints
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(tiny_dir), str(model_dir), fmt],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    bound = report["weights"] + 2 * largest_bytes + OVERHEAD_BYTES
    assert fp32_bytes > times * bound  # the checkpoint could not have been held whole under the bound
    assert report["peak"] - report["baseline"] <= bound, report
