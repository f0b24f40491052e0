"""The shared PEFT validator refuses every malformed adapter with the field at fault, and the artifact
digest is a stable content address."""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from openlora.adapter_format import AdapterFormatError, validate_adapter_dir
from openlora.artifact import ArtifactDigest, digest_bytes, digest_dir
from openlora.base_model import BaseModelSpec, UnsupportedModelError

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@pytest.fixture(scope="module")
def llama_config() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        architectures=["LlamaForCausalLM"],
    )


@pytest.fixture(scope="module")
def spec(llama_config: LlamaConfig) -> BaseModelSpec:
    return BaseModelSpec.from_hf_config(llama_config.to_dict(), "tiny-llama")


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory: pytest.TempPathFactory, llama_config: LlamaConfig) -> Path:
    torch.manual_seed(0)
    model = get_peft_model(
        LlamaForCausalLM(llama_config),
        LoraConfig(
            r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
        ),
    )
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    return out


@pytest.fixture
def adapter(tmp_path: Path, peft_dir: Path) -> Path:
    dst = tmp_path / "a"
    shutil.copytree(peft_dir, dst)
    return dst


def _rewrite_tensors(path: Path, change) -> None:
    tensors = load_file(path / WEIGHTS)
    change(tensors)
    save_file(tensors, path / WEIGHTS)


def _rewrite_config(path: Path, change) -> None:
    config = json.loads((path / CONFIG).read_text())
    change(config)
    (path / CONFIG).write_text(json.dumps(config))


def test_peft_adapter_is_accepted_with_its_hyperparameters(adapter: Path, spec: BaseModelSpec) -> None:
    info = validate_adapter_dir(adapter, spec, max_rank=64)
    assert (info.rank, info.alpha, info.use_rslora) == (8, 32.0, False)
    assert info.target_modules == ("q_proj", "v_proj", "down_proj")
    assert info.layers == (0, 1)
    assert info.scaling == pytest.approx(4.0)


def test_rslora_scaling_uses_square_root_of_rank(adapter: Path, spec: BaseModelSpec) -> None:
    _rewrite_config(adapter, lambda c: c.update(use_rslora=True))
    assert validate_adapter_dir(adapter, spec).scaling == pytest.approx(32 / 8**0.5)


def test_pickle_file_is_refused_by_name_without_being_opened(adapter: Path, spec: BaseModelSpec) -> None:
    (adapter / "adapter_model.bin").write_bytes(b"\x80\x04 not even a valid pickle")
    with pytest.raises(AdapterFormatError) as e:
        validate_adapter_dir(adapter, spec)
    assert e.value.field == "adapter_model.bin"


def test_missing_weights_file_is_refused(adapter: Path, spec: BaseModelSpec) -> None:
    (adapter / WEIGHTS).unlink()
    with pytest.raises(AdapterFormatError, match="missing"):
        validate_adapter_dir(adapter, spec)


def test_non_finite_value_is_refused(adapter: Path, spec: BaseModelSpec) -> None:
    def poison(tensors: dict) -> None:
        name = sorted(tensors)[0]
        tensors[name][0, 0] = float("nan")

    _rewrite_tensors(adapter, poison)
    with pytest.raises(AdapterFormatError, match="NaN or infinite"):
        validate_adapter_dir(adapter, spec)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_infinity_is_refused_in_half_dtypes(adapter: Path, spec: BaseModelSpec, dtype: torch.dtype) -> None:
    def poison(tensors: dict) -> None:
        for name in tensors:
            tensors[name] = tensors[name].to(dtype)
        tensors[sorted(tensors)[-1]][-1, -1] = float("inf")

    _rewrite_tensors(adapter, poison)
    with pytest.raises(AdapterFormatError, match="NaN or infinite"):
        validate_adapter_dir(adapter, spec)


def test_half_dtypes_are_accepted(adapter: Path, spec: BaseModelSpec) -> None:
    _rewrite_tensors(adapter, lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    assert validate_adapter_dir(adapter, spec).dtype == "BF16"


def test_integer_dtype_is_refused(adapter: Path, spec: BaseModelSpec) -> None:
    _rewrite_tensors(adapter, lambda t: t.update({k: v.to(torch.int32) for k, v in t.items()}))
    with pytest.raises(AdapterFormatError, match="dtype"):
        validate_adapter_dir(adapter, spec)


def test_shape_that_does_not_fit_the_base_model_is_refused(adapter: Path, spec: BaseModelSpec) -> None:
    other = BaseModelSpec(**{**spec.__dict__, "hidden_size": 96, "name": "other"})
    with pytest.raises(AdapterFormatError, match="do not fit the base model"):
        validate_adapter_dir(adapter, other)


def test_rank_mismatch_between_config_and_tensors_is_refused(adapter: Path, spec: BaseModelSpec) -> None:
    _rewrite_config(adapter, lambda c: c.update(r=4))
    with pytest.raises(AdapterFormatError, match=r"rank 4 \(adapter_config.json.r\)"):
        validate_adapter_dir(adapter, spec)


def test_rank_over_the_limit_is_refused(adapter: Path, spec: BaseModelSpec) -> None:
    with pytest.raises(AdapterFormatError) as e:
        validate_adapter_dir(adapter, spec, max_rank=4)
    assert e.value.field == "adapter_config.json.r"


def test_size_over_the_limit_is_refused(adapter: Path, spec: BaseModelSpec) -> None:
    with pytest.raises(AdapterFormatError) as e:
        validate_adapter_dir(adapter, spec, max_size_bytes=1024)
    assert e.value.field == "size_bytes"


@pytest.mark.parametrize("key", ["auto_map", "trust_remote_code"])
def test_code_references_in_config_are_refused(adapter: Path, spec: BaseModelSpec, key: str) -> None:
    _rewrite_config(adapter, lambda c: c.update({key: {"AutoModel": "evil.Model"}}))
    with pytest.raises(AdapterFormatError, match="code references"):
        validate_adapter_dir(adapter, spec)


def test_unsupported_target_module_is_refused(adapter: Path, spec: BaseModelSpec) -> None:
    _rewrite_config(adapter, lambda c: c.update(target_modules=["q_proj", "embed_tokens"]))
    with pytest.raises(AdapterFormatError, match="embed_tokens"):
        validate_adapter_dir(adapter, spec)


def test_foreign_tensor_name_is_refused(adapter: Path, spec: BaseModelSpec) -> None:
    _rewrite_tensors(adapter, lambda t: t.update({"lm_head.weight": torch.ones(2, 2)}))
    with pytest.raises(AdapterFormatError, match="lm_head"):
        validate_adapter_dir(adapter, spec)


def test_truncated_weights_are_refused(adapter: Path, spec: BaseModelSpec) -> None:
    data = (adapter / WEIGHTS).read_bytes()
    (adapter / WEIGHTS).write_bytes(data[:-7])
    with pytest.raises(AdapterFormatError, match=r"truncated|outside the file|does not match"):
        validate_adapter_dir(adapter, spec)


def test_oversized_header_is_refused_before_reading_it(adapter: Path, spec: BaseModelSpec) -> None:
    (adapter / WEIGHTS).write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(AdapterFormatError, match="header of"):
        validate_adapter_dir(adapter, spec)


def test_dora_is_refused(adapter: Path, spec: BaseModelSpec) -> None:
    _rewrite_config(adapter, lambda c: c.update(use_dora=True))
    with pytest.raises(AdapterFormatError, match="DoRA"):
        validate_adapter_dir(adapter, spec)


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("alora_invocation_tokens", [7, 8], "aLoRA"),
        ("target_parameters", ["mlp.up_proj.weight"], "target_parameters"),
        ("use_bdlora", {"lora_a_nblocks": 2}, "BD-LoRA"),
        ("velora_config", {"rank": 4}, "VeLoRA"),
        ("arrow_config", {"top_k": 2}, "Arrow"),
        ("megatron_config", {"tensor_model_parallel_size": 2}, "Megatron"),
        ("lora_variant_from_the_future", "gated", "unknown option"),
    ],
)
def test_lora_variants_are_refused_by_their_option(
    adapter: Path, spec: BaseModelSpec, key: str, value: object, named: str
) -> None:
    """A PEFT option that makes the adapter compute something other than B @ A on the projections (or one
    this server does not know) is refused by name at validation, not served as a plain LoRA."""
    _rewrite_config(adapter, lambda c: c.update({key: value}))
    with pytest.raises(AdapterFormatError, match=named) as refused:
        validate_adapter_dir(adapter, spec)
    assert refused.value.field.endswith(key)


def test_options_left_at_peft_defaults_are_accepted(adapter: Path, spec: BaseModelSpec) -> None:
    """Every LoraConfig field PEFT writes, at its default, passes: the refusal above is by value."""
    fields = {f.name: f for f in dataclasses.fields(LoraConfig)}
    defaults = {
        name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for name, f in fields.items()
        if name != "runtime_config" and (f.default is not dataclasses.MISSING or f.default_factory)
    }
    keep = ("r", "lora_alpha", "target_modules", "peft_type")
    _rewrite_config(adapter, lambda c: c.update({k: v for k, v in defaults.items() if k not in keep}))
    assert validate_adapter_dir(adapter, spec).rank == 8


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"lora_alpha": 1e308}, "lora_alpha"),  # finite as a JSON number; alpha / r overflows float32
        ({"lora_alpha": 8 * 1e4 + 8}, "lora_alpha"),
        ({"alpha_pattern": {"q_proj": 1e9}}, "alpha_pattern"),
    ],
)
def test_a_scaling_past_the_bound_is_refused_at_validation(adapter, spec, change, field) -> None:
    """An alpha that makes alpha / r overflow float32 passed validation and failed every request with an
    internal error as the slot loaded; any scaling past MAX_LORA_SCALING is refused up front, by field."""
    _rewrite_config(adapter, lambda c: c.update(change))
    with pytest.raises(AdapterFormatError, match="scales B @ A") as refused:
        validate_adapter_dir(adapter, spec)
    assert refused.value.field == f"adapter_config.json.{field}"


def test_a_negative_scaling_past_the_bound_is_refused_saying_its_magnitude(adapter, spec) -> None:
    """A negative alpha scales by a negative number: the refusal said it was "more than" the bound, which
    a negative number never is; it says the magnitude is."""
    _rewrite_config(adapter, lambda c: c.update({"lora_alpha": -1e6}))
    with pytest.raises(AdapterFormatError, match="scales B @ A") as refused:
        validate_adapter_dir(adapter, spec)
    assert refused.value.field == "adapter_config.json.lora_alpha"
    assert "magnitude more than 10000" in str(refused.value)


def test_missing_lora_alpha_takes_peft_default(
    tmp_path: Path, llama_config: LlamaConfig, spec: BaseModelSpec
) -> None:
    """PEFT's LoraConfig defaults lora_alpha to 8 (not to r): a rank-16 config without it scales by 8 / 16."""
    model = get_peft_model(LlamaForCausalLM(llama_config), LoraConfig(r=16, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    _rewrite_config(tmp_path, lambda c: c.pop("lora_alpha"))
    info = validate_adapter_dir(tmp_path, spec)
    assert info.alpha == LoraConfig().lora_alpha == 8
    assert info.scaling == pytest.approx(8 / 16)


@pytest.mark.parametrize("rank", [8, 16])
def test_missing_r_takes_peft_default(
    tmp_path: Path, llama_config: LlamaConfig, spec: BaseModelSpec, rank
) -> None:
    """PEFT's LoraConfig defaults r to 8: a config without it is read as rank 8 (as PEFT loads it), and
    factors of another rank are refused, naming `r` (PEFT's loader fails on their shapes)."""
    model = get_peft_model(
        LlamaForCausalLM(llama_config), LoraConfig(r=rank, lora_alpha=4, target_modules=["q_proj"])
    )
    model.save_pretrained(tmp_path)
    _rewrite_config(tmp_path, lambda c: c.pop("r"))
    if rank != LoraConfig().r:
        with pytest.raises(AdapterFormatError) as refused:
            validate_adapter_dir(tmp_path, spec)
        assert "do not have rank 8 (adapter_config.json.r)" in str(refused.value)
        return
    info = validate_adapter_dir(tmp_path, spec)
    assert info.rank == LoraConfig().r == 8
    assert info.scaling == pytest.approx(4 / 8)


def test_digest_depends_on_content_not_on_location(adapter: Path, peft_dir: Path) -> None:
    assert digest_dir(adapter) == digest_dir(peft_dir)
    files = {name: (adapter / name).read_bytes() for name in (CONFIG, WEIGHTS)}
    assert digest_bytes(files) == digest_dir(adapter)
    _rewrite_config(adapter, lambda c: c.update(lora_alpha=31))
    assert digest_dir(adapter) != digest_dir(peft_dir)


def test_digest_refuses_a_file_shorter_than_declared() -> None:
    digest = ArtifactDigest()
    digest.begin_file("a", 10)
    digest.update(b"12345")
    with pytest.raises(ValueError, match="missing 5 bytes"):
        digest.hexdigest()


def test_unsupported_architecture_is_named() -> None:
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        BaseModelSpec.from_hf_config({"architectures": ["GPT2LMHeadModel"]}, "gpt2")


def test_fingerprint_ignores_the_name_but_not_the_dimensions(spec: BaseModelSpec) -> None:
    renamed = BaseModelSpec(**{**spec.__dict__, "name": "renamed"})
    wider = BaseModelSpec(**{**spec.__dict__, "intermediate_size": 256})
    assert renamed.fingerprint == spec.fingerprint
    assert wider.fingerprint != spec.fingerprint


def _peft_loaded_lora_a(adapter: Path, llama_config: LlamaConfig) -> torch.Tensor:
    from peft import PeftModel

    torch.manual_seed(1)
    model = PeftModel.from_pretrained(LlamaForCausalLM(llama_config), adapter)
    return model.base_model.model.model.layers[1].self_attn.q_proj.lora_A["default"].weight.detach()


@pytest.mark.parametrize(
    ("rename", "peft_loads_it"),
    [
        (lambda k: k.replace(".lora_A.weight", ".lora_A.default.weight"), True),
        (lambda k: k.replace(".lora_A.weight", ".lora_A.foo.weight"), False),
        (lambda k: k.replace(".layers.1.", ".layers.01."), False),
    ],
)
def test_tensor_names_are_read_as_peft_loads_them(adapter, spec, llama_config, rename, peft_loads_it) -> None:
    """A tensor PEFT's loader maps onto no LoRA weight (another adapter name inside the key, a layer index
    with a leading zero) leaves PEFT serving the base projection: refused here, by name, rather than
    applied. One it loads is served."""
    want = load_file(adapter / WEIGHTS)["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    _rewrite_tensors(adapter, lambda t: t.update({rename(k): t.pop(k) for k in list(t)}))
    assert torch.equal(_peft_loaded_lora_a(adapter, llama_config), want) == peft_loads_it
    if peft_loads_it:
        assert validate_adapter_dir(adapter, spec).rank == 8
        return
    with pytest.raises(AdapterFormatError, match="is not the LoRA A/B of a supported projection"):
        validate_adapter_dir(adapter, spec)


@pytest.mark.parametrize(
    "key", ["kasa_config", "velora_config", "monteclora_config", "arrow_config", "use_bdlora"]
)
def test_a_variant_sub_config_left_empty_is_refused_as_peft_switches_it_on(adapter, spec, key) -> None:
    """PEFT builds a variant's config from `{}` (every default): the variant is on, so the adapter is
    refused here, not served as a plain LoRA."""
    _rewrite_config(adapter, lambda c: c.update({key: {}}))
    with pytest.raises(AdapterFormatError, match="not supported") as refused:
        validate_adapter_dir(adapter, spec)
    assert refused.value.field.endswith(key)


def test_an_unknown_option_set_to_an_empty_object_is_refused(adapter, spec) -> None:
    _rewrite_config(adapter, lambda c: c.update(newer_variant_config={}))
    with pytest.raises(AdapterFormatError, match="unknown option") as refused:
        validate_adapter_dir(adapter, spec)
    assert refused.value.field.endswith("newer_variant_config")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"target_modules": ".*q_proj", "layers_to_transform": [0]}, "layers_to_transform"),
        ({"target_modules": ".*q_proj", "layers_pattern": "layers"}, "layers_pattern"),
        ({"layers_pattern": "layers"}, "layers_pattern"),
    ],
)
def test_layer_options_peft_refuses_are_refused(adapter, spec, change, field) -> None:
    config = {**json.loads((adapter / CONFIG).read_text()), **change}
    with pytest.raises(ValueError, match="layers_"):
        LoraConfig(
            **{k: v for k, v in config.items() if k in {f.name for f in dataclasses.fields(LoraConfig)}}
        )
    _rewrite_config(adapter, lambda c: c.update(change))
    with pytest.raises(AdapterFormatError) as refused:
        validate_adapter_dir(adapter, spec)
    assert refused.value.field == f"adapter_config.json.{field}"


@pytest.mark.parametrize(
    "change,reason",
    [
        (lambda c: c.pop("peft_type"), "is required"),
        (lambda c: c.update(peft_type="lora"), "is not LORA"),
        (lambda c: c.update(peft_type="IA3"), "is not LORA"),
    ],
)
def test_a_peft_type_peft_cannot_load_is_refused(adapter: Path, spec: BaseModelSpec, change, reason) -> None:
    """PEFT picks the config class by the exact name: absent or in another case it raises KeyError."""
    _rewrite_config(adapter, change)
    with pytest.raises(AdapterFormatError) as caught:
        validate_adapter_dir(adapter, spec)
    assert caught.value.field == "adapter_config.json.peft_type" and reason in caught.value.reason


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM", "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION"])
def test_task_types_peft_knows_are_accepted(adapter: Path, spec: BaseModelSpec, task_type) -> None:
    _rewrite_config(adapter, lambda c: c.update(task_type=task_type))
    validate_adapter_dir(adapter, spec)


@pytest.mark.parametrize("task_type", ["BOGUS", "causal_lm", 3])
def test_a_task_type_peft_refuses_is_refused(adapter: Path, spec: BaseModelSpec, task_type) -> None:
    _rewrite_config(adapter, lambda c: c.update(task_type=task_type))
    with pytest.raises(AdapterFormatError) as caught:
        validate_adapter_dir(adapter, spec)
    assert caught.value.field == "adapter_config.json.task_type"


def test_a_rank_0_tensor_is_refused_saying_so(adapter: Path, spec: BaseModelSpec) -> None:
    def rank_0(tensors):
        for key in list(tensors):
            if "lora_A" in key:
                tensors[key] = tensors[key][:0]
            else:
                tensors[key] = tensors[key][:, :0]

    _rewrite_tensors(adapter, rank_0)
    with pytest.raises(AdapterFormatError) as caught:
        validate_adapter_dir(adapter, spec)
    assert caught.value.field == "adapter_model.safetensors"
    assert "has a dimension of 0 (rank 0?)" in caught.value.reason
