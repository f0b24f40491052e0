"""PEFT adapters whose modules have their own rank and alpha (`rank_pattern`, `alpha_pattern`) match
transformers + PEFT, alone and batched with others; the patterns' keys and values are checked."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from data_plane.engine.request import AdapterRef
from openlora.adapter_format import AdapterFormatError, validate_adapter_dir
from openlora.artifact import digest_dir
from openlora.base_model import BaseModelSpec

from .conftest import ALL_SEVEN, assert_served_like_peft, greedy, make_engine, run_to_completion
from .reference import load_reference, reference_greedy, write_peft_adapter

# PEFT reads each key as the end of a module's name: every q_proj; one layer's down_proj; v_proj's alpha.
RANK_PATTERN = {"q_proj": 4, "model.layers.1.mlp.down_proj": 16, "layers.0.self_attn.k_proj": 2}
ALPHA_PATTERN = {"v_proj": 64, "layers.0.self_attn.o_proj": 3}


def _write_patterned(model_dir: Path, out: Path, use_rslora: bool, seed: int) -> Path:
    return write_peft_adapter(
        model_dir,
        out,
        seed,
        r=8,
        lora_alpha=16,
        target_modules=ALL_SEVEN,
        rank_pattern=RANK_PATTERN,
        alpha_pattern=ALPHA_PATTERN,
        use_rslora=use_rslora,
    )


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_qwen2"])
def patterned(request, tmp_path_factory):
    model = request.getfixturevalue(request.param)
    root = tmp_path_factory.mktemp("patterned")
    dirs = {
        "plain": _write_patterned(model.model_dir, root / "plain", use_rslora=False, seed=5),
        "rslora": _write_patterned(model.model_dir, root / "rslora", use_rslora=True, seed=6),
    }
    return model, dirs


def _spec(model) -> BaseModelSpec:
    config = json.loads((model.model_dir / "config.json").read_text())
    return BaseModelSpec.from_hf_config(config, model.model_dir.name)


def _ref(path: Path) -> AdapterRef:
    return AdapterRef(key=digest_dir(path), path=path)


def test_patterned_adapters_match_peft_alone_and_batched_with_others(patterned):
    model, dirs = patterned
    rng = random.Random(4)
    prompts = [[rng.randrange(model.vocab_size) for _ in range(n)] for n in (5, 17, 9, 26, 3)]
    cases = {
        "plain-0": (prompts[0], "plain"),
        "rslora-1": (prompts[1], "rslora"),
        "base-2": (prompts[2], None),
        "r8-3": (prompts[3], "r8_all"),
        "plain-4": (prompts[4], "plain"),
    }
    paths = {**dirs, "r8_all": model.adapter_dirs["r8_all"]}
    engine = make_engine(model)
    for request_id, (prompt, name) in cases.items():
        engine.add_request(greedy(request_id, prompt, [_ref(paths[name])] if name else ()))
    results = run_to_completion(engine)
    for request_id, (prompt, name) in cases.items():
        reference = load_reference(model.model_dir, [paths[name]] if name else None)
        want_tokens, want_logprobs = reference_greedy(reference, prompt)
        got_tokens, got_logprobs = results[request_id]
        assert got_tokens == want_tokens, request_id
        assert got_logprobs == pytest.approx(want_logprobs, abs=1e-3), request_id


def test_the_patterns_set_each_modules_rank_and_scaling(patterned):
    model, dirs = patterned
    spec = _spec(model)
    info = validate_adapter_dir(dirs["plain"], spec)
    assert info.rank == 16  # the slot rank: the largest module rank
    ranks = {(t.layer, t.module): t.shape[0] for t in info.tensors if t.which == "A"}
    assert ranks[(0, "q_proj")] == ranks[(1, "q_proj")] == 4
    assert ranks[(1, "down_proj")] == 16 and ranks[(0, "down_proj")] == 8
    assert ranks[(0, "k_proj")] == 2 and ranks[(1, "k_proj")] == 8
    assert info.scaling_of(0, "q_proj") == pytest.approx(16 / 4)
    assert info.scaling_of(1, "v_proj") == pytest.approx(64 / 8)
    assert info.scaling_of(0, "o_proj") == pytest.approx(3 / 8)
    assert info.scaling_of(1, "o_proj") == pytest.approx(16 / 8)
    assert info.scaling_of(1, "down_proj") == pytest.approx(16 / 16)
    rslora = validate_adapter_dir(dirs["rslora"], spec)
    assert rslora.scaling_of(1, "v_proj") == pytest.approx(64 / 8**0.5)
    assert rslora.scaling_of(0, "q_proj") == pytest.approx(16 / 4**0.5)


def _with_config(src: Path, dst: Path, **changes) -> Path:
    import shutil

    shutil.copytree(src, dst)
    config_path = dst / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(changes)
    config_path.write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        (
            {"rank_pattern": {"(q_proj": 4}},
            "adapter_config.json.rank_pattern",
            "not a valid regular expression",
        ),
        # PEFT matches with `re`: what it cannot parse is refused, though the `regex` engine would take it
        ({"alpha_pattern": {r"\p{L}_proj": 4}}, "adapter_config.json.alpha_pattern", "bad escape"),
        # 30 characters that the `regex` engine would expand to 10^9 items when compiling (it took the
        # whole memory of the machine): refused before compiling
        ({"rank_pattern": {"(?:(?:a{1000}){1000}){1000}": 4}}, "adapter_config.json.rank_pattern", "expand"),
        ({"rank_pattern": {"q_proj": 0}}, "adapter_config.json.rank_pattern", "not a rank"),
        ({"rank_pattern": {"q_proj": True}}, "adapter_config.json.rank_pattern", "not a rank"),
        ({"alpha_pattern": {"v_proj": "8"}}, "adapter_config.json.alpha_pattern", "finite number"),
        ({"alpha_pattern": {"v_proj": None}}, "adapter_config.json.alpha_pattern", "finite number"),
        ({"rank_pattern": ["q_proj", 4]}, "adapter_config.json.rank_pattern", "must map"),
        # Bounded: every key is tried against every module a worker loads.
        ({"alpha_pattern": {f"k{i}": 1 for i in range(1025)}}, "adapter_config.json.alpha_pattern", "1024"),
        # The tensors say q_proj has rank 4: a config that says 6 is refused, naming the pattern.
        ({"rank_pattern": {**RANK_PATTERN, "q_proj": 6}}, "adapter_model.safetensors", "rank_pattern"),
        # Without the pattern, the tensors' ranks contradict r.
        ({"rank_pattern": {}}, "adapter_model.safetensors", "adapter_config.json.r"),
    ],
)
def test_bad_patterns_are_refused_naming_the_field(patterned, tmp_path, changes, field, words):
    model, dirs = patterned
    spec = _spec(model)
    bad = _with_config(dirs["plain"], tmp_path / "bad", **changes)
    with pytest.raises(AdapterFormatError) as refused:
        validate_adapter_dir(bad, spec)
    assert refused.value.field == field
    assert words in refused.value.reason


def test_a_pattern_rank_above_the_workers_maximum_is_refused(patterned):
    model, dirs = patterned
    spec = _spec(model)
    with pytest.raises(AdapterFormatError) as refused:
        validate_adapter_dir(dirs["plain"], spec, max_rank=8)
    assert refused.value.field == "adapter_config.json.rank_pattern"
    assert "exceeds the maximum of 8" in refused.value.reason


# PEFT reads pattern keys as regular expressions (`get_pattern_key`); the first key in order that matches
# the end of a module's name wins.
REGEX_RANK_PATTERN = {
    r"layers\.[01]\.mlp\.(gate|up)_proj": 4,
    r"(q|k)_proj": 2,
    r"^model.layers.1.*o_proj": 12,
}
REGEX_ALPHA_PATTERN = {r"layers\.1\..*": 5, r".*down_proj": 40}


def test_regular_expression_keys_set_each_modules_rank_and_alpha_as_peft_does(tiny_llama, tmp_path):
    adapter = write_peft_adapter(
        tiny_llama.model_dir,
        tmp_path / "regex",
        7,
        r=8,
        lora_alpha=16,
        target_modules=ALL_SEVEN,
        rank_pattern=REGEX_RANK_PATTERN,
        alpha_pattern=REGEX_ALPHA_PATTERN,
    )
    info = validate_adapter_dir(adapter, _spec(tiny_llama))
    ranks = {(t.layer, t.module): t.shape[0] for t in info.tensors if t.which == "A"}
    # the ranks PEFT built are those in the file: the validator read the same keys the same way
    assert ranks[(0, "gate_proj")] == ranks[(1, "up_proj")] == 4
    assert ranks[(0, "q_proj")] == ranks[(1, "k_proj")] == 2
    assert ranks[(1, "o_proj")] == 12 and ranks[(0, "o_proj")] == 8
    assert info.scaling_of(1, "v_proj") == pytest.approx(5 / 8)
    assert info.scaling_of(0, "down_proj") == pytest.approx(40 / 8)
    # The first matching key in the file's order wins: PEFT writes the config with sorted keys, so
    # `.*down_proj` comes before `layers\.1\..*` for the adapter PEFT loads back, and here.
    assert list(json.loads((adapter / "adapter_config.json").read_text())["alpha_pattern"]) == [
        r".*down_proj",
        r"layers\.1\..*",
    ]
    assert info.scaling_of(1, "down_proj") == pytest.approx(40 / 8)
    rng = random.Random(8)
    prompts = {f"p{n}": [rng.randrange(tiny_llama.vocab_size) for _ in range(n)] for n in (4, 19)}
    assert_served_like_peft(tiny_llama, adapter, prompts)


def test_pattern_matching_past_its_time_budget_refuses_the_adapter_naming_the_key(patterned, monkeypatch):
    """A tenant's expressions run under a deadline (here already passed): the adapter is refused, naming
    the option, instead of a thread backtracking for as long as the expression makes it."""
    import openlora.adapter_format as adapter_format

    model, dirs = patterned
    monkeypatch.setattr(adapter_format, "PATTERN_MATCH_BUDGET_S", 0.0)
    with pytest.raises(AdapterFormatError) as refused:
        validate_adapter_dir(dirs["plain"], _spec(model))
    assert refused.value.field == "adapter_config.json.rank_pattern"
    assert "took more than" in refused.value.reason


def test_keys_that_mean_something_else_to_the_regex_engine_are_read_as_re_reads_them(tiny_llama, tmp_path):
    # To `regex` these are fuzzy matching ("k_proj with one error": q_proj, v_proj, o_proj too) and a
    # POSIX class; to `re`, PEFT's engine, literal text and a set that no module name matches.
    adapter = write_peft_adapter(
        tiny_llama.model_dir,
        tmp_path / "fuzzy",
        9,
        r=8,
        lora_alpha=8,
        target_modules=ALL_SEVEN,
        rank_pattern={"(?:k_proj){e<=1}": 4},
        alpha_pattern={"(?:k_proj){e<=1}": 512, "[[:alpha:]]_proj": 256},
    )
    info = validate_adapter_dir(adapter, _spec(tiny_llama))
    assert {t.shape[0] for t in info.tensors if t.which == "A"} == {8}
    assert info.scaling_of(0, "q_proj") == info.scaling_of(0, "k_proj") == pytest.approx(1.0)
    rng = random.Random(10)
    prompts = {f"p{n}": [rng.randrange(tiny_llama.vocab_size) for _ in range(n)] for n in (5, 17)}
    assert_served_like_peft(tiny_llama, adapter, prompts)


def test_negative_and_zero_alphas_are_served_as_peft_serves_them(tiny_llama, tmp_path):
    """PEFT takes any alpha: a negative one flips the adapter's delta, 0 turns a module off (they were
    refused as "not a positive number" though the README says any alpha)."""
    variants = {
        "negative": {"lora_alpha": -16},
        "zero": {"lora_alpha": 0},
        "negative_pattern": {"alpha_pattern": {"q_proj": -4.0}},
    }
    rng = random.Random(5)
    for name, changes in variants.items():
        path = _with_config(tiny_llama.adapter_dirs["r8_all"], tmp_path / name, **changes)
        validate_adapter_dir(path)
        prompts = {f"{name}-{i}": [rng.randrange(tiny_llama.vocab_size) for _ in range(9)] for i in range(2)}
        assert_served_like_peft(tiny_llama, path, prompts)


def test_an_engine_refusing_a_pattern_rank_names_the_adapter_not_r(patterned):
    """`r` is 8 and a `rank_pattern` entry larger: the refusal blamed `adapter.r` ("rank N exceeds"),
    which a user reads as the value of r."""
    from data_plane.engine.errors import AdapterLoadError
    from data_plane.engine.validation import _validate_adapters, rank_of

    _, dirs = patterned
    ref = _ref(dirs["plain"])
    largest = rank_of(ref)
    assert largest > 8
    with pytest.raises(AdapterLoadError) as refused:
        _validate_adapters((ref,), max_lora_rank=largest - 1)
    assert refused.value.field == "adapter"
    assert f"its largest rank, {largest} (`r` or a `rank_pattern` entry)" in refused.value.reason


def test_an_empty_pattern_key_matches_no_module_as_in_peft(patterned):
    """PEFT saves and serves an adapter whose rank_pattern or alpha_pattern has the key "" (it matches
    no module name); it was refused as "not a regular expression of at least one character"."""
    from openlora.adapter_format import PatternMatcher

    matcher = PatternMatcher({"": 4, "q_proj": 2}, "alpha_pattern")
    assert matcher.value("model.layers.0.self_attn.q_proj", 8) == 2
    assert matcher.value("model.layers.0.self_attn.v_proj", 8) == 8
    model, dirs = patterned
    config = json.loads((dirs["plain"] / "adapter_config.json").read_text())
    with_empty = _with_config(
        dirs["plain"], dirs["plain"].parent / "empty-key", alpha_pattern={"": 4, **config["alpha_pattern"]}
    )
    validate_adapter_dir(with_empty, _spec(model))
