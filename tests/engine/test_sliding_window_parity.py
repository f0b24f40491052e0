"""Sliding-window layers are served as transformers runs them, to the model's full length: greedy tokens
and every step's logits against transformers on tiny random checkpoints it wrote, a Mistral (every layer
slides by 8) and a Qwen2 whose first layer attends in full and the other two slide by 8, with prompts
shorter than, as long as and longer than the window and generation well past it; through prefill in
one piece and in chunks that straddle the window, several sequences of different lengths in a batch,
KV blocks smaller than the window (whole blocks fall out of it) and larger, and recompute after
preemption. The references are checked to slide (they differ from full attention past the window)."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from .conftest import TINY_SHAPE, TinyModel, greedy, make_engine, run_to_completion
from .reference import load_reference, reference_greedy

WINDOW = 8
MAX_POSITIONS = 512
# model type -> (its config's sliding settings, each layer's window as transformers reads them)
MODELS = {
    "mistral": (dict(sliding_window=WINDOW), (WINDOW, WINDOW)),
    "qwen2": (
        dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
        (None, WINDOW, WINDOW),
    ),
}
# shorter than, as long as, and longer than the window (the last by several windows)
PROMPT_LENS = {"short": 5, "exact": WINDOW, "long": 13, "longer": 30}
LOGIT_ATOL = 1e-4  # float32 engine against float32 transformers


def _write(root: Path, model_type: str) -> TinyModel:
    """A random checkpoint written by transformers with MODELS' sliding settings (biases made nonzero)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    sliding, _ = MODELS[model_type]
    settings = dict(
        TINY_SHAPE,
        max_position_embeddings=MAX_POSITIONS,
        initializer_range=0.1,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**settings, **sliding}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.1)
    model_dir = root / model_type
    model.save_pretrained(model_dir)
    return TinyModel(model_dir, {}, settings["vocab_size"])


def _full_attention_twin(model: TinyModel, out: Path):
    """transformers' model of the same weights with every layer attending in full."""
    shutil.copytree(model.model_dir, out)
    path = out / "config.json"
    config = json.loads(path.read_text())
    config["sliding_window"] = None
    if "layer_types" in config:
        config.update(use_sliding_window=False, layer_types=["full_attention"] * len(config["layer_types"]))
    path.write_text(json.dumps(config))
    return load_reference(out)


@pytest.fixture(scope="module", params=list(MODELS))
def sliding_model(request, tmp_path_factory) -> TinyModel:
    return _write(tmp_path_factory.mktemp("sliding"), request.param)


@pytest.fixture(scope="module")
def reference(sliding_model):
    return load_reference(sliding_model.model_dir)


def _prompts(model: TinyModel, lens: dict[str, int]) -> dict[str, list[int]]:
    gen = torch.Generator().manual_seed(sum(lens.values()))
    return {rid: torch.randint(model.vocab_size, (n,), generator=gen).tolist() for rid, n in lens.items()}


def _serve(model: TinyModel, prompts: dict[str, list[int]], max_tokens: int, **engine_options):
    """Runs the prompts together in one engine: request id -> (greedy tokens, (steps, vocab) logits the
    engine sampled each from), and the most preemptions any sequence went through."""
    engine = make_engine(model, **engine_options)
    assert engine.max_model_len == min(MAX_POSITIONS, engine.runner.num_kv_blocks * engine.runner.block_size)
    logits: dict[str, list[torch.Tensor]] = defaultdict(list)
    most_preemptions = 0
    run = engine.runner.run

    def recording_run(seqs, num_tokens, slots):
        nonlocal most_preemptions
        most_preemptions = max(most_preemptions, *(seq.num_preemptions for seq in seqs))
        sampled, rows = run(seqs, num_tokens, slots)
        for i, row in zip(sampled, rows, strict=True):
            logits[seqs[i].request_id].append(row.clone())
        return sampled, rows

    engine.runner.run = recording_run
    for request_id, prompt in prompts.items():
        engine.add_request(greedy(request_id, prompt, max_tokens=max_tokens))
    results = run_to_completion(engine)
    served = {rid: (results[rid][0], torch.stack(logits[rid])) for rid in prompts}
    return served, most_preemptions


@torch.no_grad()
def _reference_logits(reference, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """(len(tokens), vocab) transformers' logits at each step of generating `tokens` after `prompt`: one
    forward over the whole sequence, where position i sees only the tokens up to i (each step's own
    recompute)."""
    ids = torch.tensor([prompt + tokens[:-1]])
    return reference(ids).logits[0, len(prompt) - 1 :].float()


def _assert_matches_transformers(reference, prompts, served, max_tokens: int) -> None:
    for request_id, prompt in prompts.items():
        tokens, logits = served[request_id]
        assert len(tokens) == max_tokens, f"{request_id}: cut short at {len(tokens)} tokens"
        want = _reference_logits(reference, prompt, tokens)
        assert logits.shape == want.shape
        diff = (logits - want).abs().max().item()
        assert diff <= LOGIT_ATOL, f"{request_id}: logits differ by {diff}"
        assert tokens == want.argmax(dim=-1).tolist(), request_id  # greedy at every step


def test_engine_follows_the_window_where_it_changes_transformers_output(sliding_model, reference, tmp_path):
    # The boundary, observed in transformers: the query at position i sees keys j with i - WINDOW < j <= i,
    # so up to position WINDOW - 1 it sees every key (as under full attention) and from position WINDOW on
    # it no longer sees the earliest ones. The engine's logits follow the sliding model at every step.
    prompt = _prompts(sliding_model, {"p": 5})["p"]
    served, _ = _serve(sliding_model, {"p": prompt}, max_tokens=3 * WINDOW)
    tokens, logits = served["p"]
    sliding = _reference_logits(reference, prompt, tokens)  # step k: the query at position 4 + k
    full = _reference_logits(_full_attention_twin(sliding_model, tmp_path / "full"), prompt, tokens)
    within = WINDOW - len(prompt) + 1  # the steps whose query sits below position WINDOW
    torch.testing.assert_close(sliding[:within], full[:within])
    differs = (sliding - full).abs().amax(dim=-1)  # (steps,)
    assert (differs[within:] > 100 * LOGIT_ATOL).all(), differs
    assert (logits - sliding).abs().max().item() <= LOGIT_ATOL


@pytest.mark.parametrize("block_size", [4, 16])  # 4: whole blocks fall out of the window
def test_greedy_tokens_and_logits_match_transformers_past_the_window(sliding_model, reference, block_size):
    _, windows = MODELS[sliding_model.model_dir.name]
    prompts = _prompts(sliding_model, PROMPT_LENS)
    served, _ = _serve(sliding_model, prompts, max_tokens=24, block_size=block_size, num_kv_blocks=256)
    _assert_matches_transformers(reference, prompts, served, max_tokens=24)
    short = prompts["short"]
    assert served["short"][0] == reference_greedy(reference, short, max_tokens=24)[0]
    assert make_engine(sliding_model).model_config.layer_windows == windows


# A few tokens a step: prompts arrive in chunks whose cached prefix passes the window, mixed with the decode
# rows of the sequences already generating; the budgets vary where chunks start against the 4-token blocks.
@pytest.mark.parametrize("max_num_batched_tokens", [5, 6, 7])
def test_chunked_prefill_with_chunks_straddling_the_window(sliding_model, reference, max_num_batched_tokens):
    prompts = _prompts(sliding_model, {"short": 5, "long": 13, "longer": 30, "longest": 41})
    served, _ = _serve(
        sliding_model, prompts, max_tokens=12, block_size=4, max_num_batched_tokens=max_num_batched_tokens
    )
    _assert_matches_transformers(reference, prompts, served, max_tokens=12)


def test_recompute_after_preemption_matches_transformers(sliding_model, reference):
    # 14 blocks of 4 tokens for four sequences growing to 29-37 tokens: some are preempted and recomputed
    # past their window.
    prompts = _prompts(sliding_model, {"a": 5, "b": WINDOW, "c": 11, "d": 13})
    served, preemptions = _serve(sliding_model, prompts, max_tokens=24, block_size=4, num_kv_blocks=14)
    assert preemptions > 0
    _assert_matches_transformers(reference, prompts, served, max_tokens=24)
