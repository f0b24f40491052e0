"""Adapters whose `target_modules` PEFT saved as module-name suffixes or full names (as
`target_modules="all-linear"` is saved) are accepted and match transformers + PEFT, and so are entries that
name no module of the model (PEFT ignores them) and bias training on a base without biases; entries that
name another module of the model, tensors the entries do not match, trained base biases, PEFT options that
change the model beyond LoRA on the seven projections, and adapters trained on a base PEFT changed (PiSSA
and kin, unless PEFT converted them to a plain LoRA) are refused, naming the field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from data_plane.engine.request import AdapterRef
from openlora.adapter_format import AdapterFormatError, validate_adapter_dir
from openlora.artifact import digest_dir
from openlora.base_model import BaseModelSpec

from .conftest import ALL_SEVEN, assert_served_like_peft, greedy, make_engine, run_to_completion
from .reference import load_reference, reference_greedy, write_peft_adapter


def _write(model_dir: Path, out: Path, target_modules, seed: int) -> Path:
    return write_peft_adapter(model_dir, out, seed, r=8, lora_alpha=16, target_modules=target_modules)


@pytest.fixture(scope="module")
def spelled(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("spelled")
    return tiny_llama, {
        "all_linear": _write(tiny_llama.model_dir, root / "all_linear", "all-linear", seed=11),
        "suffixes": _write(
            tiny_llama.model_dir, root / "suffixes", ["self_attn.q_proj", "mlp.down_proj"], seed=12
        ),
    }


def _spec(model) -> BaseModelSpec:
    return BaseModelSpec.from_hf_config(json.loads((model.model_dir / "config.json").read_text()), "tiny")


def test_peft_saves_all_linear_as_full_module_names_and_they_are_accepted(spelled):
    model, dirs = spelled
    saved = json.loads((dirs["all_linear"] / "adapter_config.json").read_text())["target_modules"]
    assert any(name.startswith("model.layers.") for name in saved)  # what this test is about
    assert validate_adapter_dir(dirs["all_linear"], _spec(model)).target_modules == tuple(ALL_SEVEN)
    assert validate_adapter_dir(dirs["suffixes"], _spec(model)).target_modules == ("q_proj", "down_proj")


def test_adapters_with_suffix_and_full_names_match_peft(spelled):
    model, dirs = spelled
    prompts = {"all_linear": [5, 9, 2, 33, 7, 1], "suffixes": [8, 8, 3, 40, 12]}
    engine = make_engine(model)
    for name, prompt in prompts.items():
        engine.add_request(greedy(name, prompt, [AdapterRef(key=digest_dir(dirs[name]), path=dirs[name])]))
    results = run_to_completion(engine)
    for name, prompt in prompts.items():
        want_tokens, want_logprobs = reference_greedy(load_reference(model.model_dir, [dirs[name]]), prompt)
        got_tokens, got_logprobs = results[name]
        assert got_tokens == want_tokens, name
        assert got_logprobs == pytest.approx(want_logprobs, abs=1e-3), name


def _with_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    path = dst / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return dst


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"target_modules": ["model.layers.0.self_attn.rotary_emb"]}, "target_modules", "rotary_emb"),
        ({"target_modules": ["lm_head", "q_proj"]}, "target_modules", "lm_head"),
        # Names only layer 0's projections: the tensors of layer 1 are not what the config describes.
        (
            {"target_modules": [f"model.layers.0.{p}" for p in ("self_attn.q_proj", "mlp.down_proj")]},
            "target_modules",
            "model.layers.1",
        ),
        ({"target_modules": ["q_proj"]}, "target_modules", "down_proj"),
        ({"target_modules": ["embed_tokens", "q_proj", "down_proj"]}, "target_modules", "embed_tokens"),
        ({"target_modules": ["model.layers.0", "q_proj", "down_proj"]}, "target_modules", "model.layers.0"),
        ({"target_modules": ["q_proj", "down_proj", 3]}, "target_modules", "list of module names"),
        ({"target_modules": []}, "target_modules", "selects no module"),
        ({"target_modules": ""}, "target_modules", "selects no module"),
        ({"bias": "some"}, "bias", "'some'"),
        ({"lora_bias": True}, "lora_bias", "not supported"),
        ({"trainable_token_indices": [1, 2]}, "trainable_token_indices", "not supported"),
        ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication", "not supported"),
    ],
)
def test_configs_that_do_not_describe_the_tensors_are_refused(spelled, tmp_path, changes, field, words):
    model, dirs = spelled
    adapter = _with_config(dirs["suffixes"], tmp_path / "a", **changes)
    with pytest.raises(AdapterFormatError) as e:
        validate_adapter_dir(adapter, _spec(model))
    assert e.value.field == f"adapter_config.json.{field}" and words in e.value.reason


def _pissa(model_dir: Path, root: Path, convert: bool) -> Path:
    """A PiSSA adapter (PEFT moves the weights' principal components into A and B and subtracts them from
    the base), trained one step so it differs from its start; saved as it is, or converted to a plain LoRA
    of the original base by PEFT."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(21)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")
    peft_model = get_peft_model(base, config)
    initial = root / "initial"
    if convert:
        peft_model.save_pretrained(initial)  # PEFT converts against the adapter as it was initialized
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn_like(param) * 0.2)
    out = root / ("converted" if convert else "as_is")
    if convert:
        peft_model.save_pretrained(out, path_initial_model_for_weight_conversion=initial)
    else:
        peft_model.save_pretrained(out)
    return out


def test_adapters_trained_on_a_base_peft_changed_are_refused_unless_converted(tiny_llama, tmp_path):
    spec = _spec(tiny_llama)
    with pytest.raises(AdapterFormatError) as e:
        validate_adapter_dir(_pissa(tiny_llama.model_dir, tmp_path / "a", convert=False), spec)
    assert e.value.field == "adapter_config.json.init_lora_weights" and "path_initial_model" in e.value.reason
    converted = _pissa(tiny_llama.model_dir, tmp_path / "b", convert=True)
    assert validate_adapter_dir(converted, spec).rank == 8  # PEFT's conversion doubles the rank
    prompt = [4, 19, 7, 33, 2]
    engine = make_engine(tiny_llama)
    engine.add_request(greedy("pissa", prompt, [AdapterRef(key=digest_dir(converted), path=converted)]))
    got_tokens, got_logprobs = run_to_completion(engine)["pissa"]
    want_tokens, want_logprobs = reference_greedy(load_reference(tiny_llama.model_dir, [converted]), prompt)
    assert got_tokens == want_tokens
    assert got_logprobs == pytest.approx(want_logprobs, abs=1e-3)


def test_target_names_no_module_of_the_model_has_are_ignored_as_peft_ignores_them(tiny_llama, tmp_path):
    """A list written for several architectures (GPT-2's c_attn, Falcon's query_key_value, Baichuan's
    W_pack) beside Llama's projections: PEFT adapts the projections and ignores the rest."""
    targets = [*ALL_SEVEN, "c_attn", "query_key_value", "W_pack"]
    adapter = write_peft_adapter(
        tiny_llama.model_dir, tmp_path / "a", 13, r=8, lora_alpha=16, target_modules=targets
    )
    assert validate_adapter_dir(adapter, _spec(tiny_llama)).target_modules == tuple(ALL_SEVEN)
    assert_served_like_peft(tiny_llama, adapter, {"x": [3, 14, 15, 9, 2], "y": [27, 1, 8]})


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_training_on_a_base_without_biases_leaves_a_plain_lora_that_is_served(
    tiny_llama, tmp_path, bias
):
    adapter = write_peft_adapter(
        tiny_llama.model_dir, tmp_path / bias, 14, r=8, lora_alpha=16, target_modules=ALL_SEVEN, bias=bias
    )
    assert validate_adapter_dir(adapter, _spec(tiny_llama)).target_modules == tuple(ALL_SEVEN)
    assert_served_like_peft(tiny_llama, adapter, {"x": [5, 6, 7, 8]})


def test_trained_base_biases_in_the_file_are_refused_naming_them(tiny_qwen2, tmp_path):
    """Qwen2's q, k and v have biases: bias='all' saves them in the adapter, and PEFT loads them into the
    base model, a change this server does not make per adapter."""
    adapter = write_peft_adapter(
        tiny_qwen2.model_dir, tmp_path / "qwen2", 15, r=8, lora_alpha=16, target_modules=ALL_SEVEN, bias="all"
    )
    with pytest.raises(AdapterFormatError) as e:
        validate_adapter_dir(adapter, _spec(tiny_qwen2))
    assert e.value.field == "adapter_model.safetensors"
    assert "bias" in e.value.reason and "bias='all'" in e.value.reason


def test_a_pattern_selecting_qwen3s_query_and_key_norms_is_refused_where_peft_refuses_it(
    tiny_qwen3, tmp_path
):
    """Qwen3 has a norm over each head of the queries and keys (`self_attn.q_norm`, `k_norm`): a pattern
    that selects them makes PEFT refuse the adapter, which was accepted and served as its projections
    alone; on a Llama base, which has no such modules, the same pattern selects only projections."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    pattern = r".*\.(q_proj|v_proj|q_norm)"
    with pytest.raises(ValueError, match="not supported"):
        get_peft_model(
            AutoModelForCausalLM.from_pretrained(tiny_qwen3.model_dir),
            LoraConfig(r=4, target_modules=pattern),
        )
    adapter = write_peft_adapter(
        tiny_qwen3.model_dir, tmp_path / "qwen3", 15, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]
    )
    selecting_norms = _with_config(adapter, tmp_path / "norms", target_modules=pattern)
    with pytest.raises(AdapterFormatError, match="q_norm") as e:
        validate_adapter_dir(selecting_norms, _spec(tiny_qwen3))
    assert e.value.field == "adapter_config.json.target_modules"
    assert validate_adapter_dir(adapter, _spec(tiny_qwen3)).target_modules == ("q_proj", "v_proj")
    assert_served_like_peft(tiny_qwen3, adapter, {"x": [3, 14, 15, 9, 2]})
