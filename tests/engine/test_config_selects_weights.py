"""An adapter is served as PEFT serves it or refused: PEFT builds LoRA only on the modules its config
selects (target_modules as names or a regular expression, layers_to_transform with layers_pattern,
exclude_modules, PEFT's default when target_modules is null) and ignores other tensors of the file, which
OpenLoRA would apply; and the rank a slot must hold is the largest module rank, not the config's `r`."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from data_plane.engine.request import AdapterRef
from openlora.adapter_format import AdapterFormatError, validate_adapter_dir
from openlora.artifact import digest_dir

from .conftest import ALL_SEVEN, greedy, make_engine, run_to_completion
from .reference import load_reference, reference_greedy, write_peft_adapter
from .test_rank_alpha_patterns import _with_config

# A file with weights for all seven projections in both layers, and configs that select fewer of them.
NARROWER = {
    "a regex selecting one module": (
        {"target_modules": r".*\.layers\.0\.self_attn\.q_proj"},
        "target_modules",
    ),
    "one layer of two": ({"layers_to_transform": [0], "layers_pattern": "layers"}, "layers_to_transform"),
    "one layer, by an int": ({"layers_to_transform": 1}, "layers_to_transform"),
    "MLP excluded": ({"exclude_modules": ["gate_proj", "up_proj", "down_proj"]}, "exclude_modules"),
    "MLP excluded by a regex": ({"exclude_modules": r".*mlp\..*"}, "exclude_modules"),
    "target_modules null: PEFT's default q_proj and v_proj": ({"target_modules": None}, "target_modules"),
}


@pytest.mark.parametrize("case", list(NARROWER))
def test_weights_the_config_does_not_select_are_refused_naming_the_key(tiny_llama, tmp_path, case):
    changes, key = NARROWER[case]
    adapter = _with_config(tiny_llama.adapter_dirs["r8_all"], tmp_path / "edited", **changes)
    with pytest.raises(AdapterFormatError) as refused:
        validate_adapter_dir(adapter)
    assert refused.value.field == f"adapter_config.json.{key}"
    assert "PEFT would leave them out" in refused.value.reason
    # exclude_modules excludes; the other keys select
    assert refused.value.reason.startswith("excludes " if key == "exclude_modules" else "does not select ")


def test_a_config_that_selects_exactly_the_files_modules_is_accepted(tiny_llama, tmp_path):
    for i, changes in enumerate(
        (
            {"target_modules": r".*\.(q|k|v|o|gate|up|down)_proj"},
            {"target_modules": "all-linear"},
            {"layers_to_transform": [0, 1], "layers_pattern": ["layers"]},
            {"exclude_modules": ["lm_head"]},
        )
    ):
        validate_adapter_dir(_with_config(tiny_llama.adapter_dirs["r8_all"], tmp_path / str(i), **changes))


@pytest.mark.parametrize(
    "changes,key",
    [
        ({"target_modules": "(unclosed"}, "target_modules"),
        ({"target_modules": "q" * 2000}, "target_modules"),
        # compiled by the `regex` engine it would expand to 10^9 items (the machine's whole memory)
        ({"target_modules": "(?:(?:.{1000}){1000}){1000}"}, "target_modules"),
        ({"exclude_modules": "(?:(?:x{1000}){1000}){1000}"}, "exclude_modules"),
        ({"exclude_modules": 7}, "exclude_modules"),
        ({"layers_to_transform": "0"}, "layers_to_transform"),
        ({"layers_to_transform": [0, True]}, "layers_to_transform"),
        ({"layers_pattern": [3]}, "layers_pattern"),
    ],
)
def test_malformed_selection_options_are_refused_naming_the_key(tiny_llama, tmp_path, changes, key):
    adapter = _with_config(tiny_llama.adapter_dirs["r8_all"], tmp_path / "edited", **changes)
    with pytest.raises(AdapterFormatError) as refused:
        validate_adapter_dir(adapter)
    assert refused.value.field == f"adapter_config.json.{key}"


def _ref(path: Path) -> AdapterRef:
    return AdapterRef(key=digest_dir(path), path=path)


def test_peft_adapters_narrowed_by_their_config_match_peft(tiny_llama, tmp_path):
    """Written by PEFT with each selection option: accepted, and served as PEFT serves them."""
    adapters = {
        "regex": write_peft_adapter(
            tiny_llama.model_dir,
            tmp_path / "regex",
            11,
            r=4,
            target_modules=r".*\.layers\.1\.mlp\.(up|down)_proj",
        ),
        "layers": write_peft_adapter(
            tiny_llama.model_dir,
            tmp_path / "layers",
            12,
            r=4,
            target_modules=ALL_SEVEN,
            layers_to_transform=[0],
        ),
        "exclude": write_peft_adapter(
            tiny_llama.model_dir,
            tmp_path / "exclude",
            13,
            r=4,
            target_modules=ALL_SEVEN,
            exclude_modules=["o_proj"],
        ),
    }
    rng = random.Random(7)
    prompts = {name: [rng.randrange(tiny_llama.vocab_size) for _ in range(9)] for name in adapters}
    engine = make_engine(tiny_llama)
    for name, path in adapters.items():
        validate_adapter_dir(path)
        engine.add_request(greedy(name, prompts[name], [_ref(path)]))
    results = run_to_completion(engine)
    for name, path in adapters.items():
        want_tokens, _ = reference_greedy(load_reference(tiny_llama.model_dir, [path]), prompts[name])
        assert results[name][0] == want_tokens, name


def test_an_adapter_whose_rank_pattern_lowers_every_module_is_served(tiny_llama, tmp_path):
    """`r` above the server's limit, every module at rank 8 by rank_pattern: the upload check accepts it
    (its modules fit a slot), and so must the engine (it refused every request, reading `r`)."""
    path = write_peft_adapter(
        tiny_llama.model_dir,
        tmp_path / "patterned",
        14,
        r=128,
        target_modules=ALL_SEVEN,
        rank_pattern={name: 8 for name in ALL_SEVEN},
    )
    assert validate_adapter_dir(path, max_rank=64).rank == 8
    engine = make_engine(tiny_llama)  # max_lora_rank 64
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    engine.add_request(greedy("patterned", prompt, [_ref(path)]))
    got_tokens, _ = run_to_completion(engine)["patterned"]
    assert got_tokens == reference_greedy(load_reference(tiny_llama.model_dir, [path]), prompt)[0]


def test_a_mix_over_the_rank_limit_by_its_patterns_is_refused_at_admission(tiny_llama, tmp_path):
    """Two adapters with r=4 whose rank_pattern raises one module to 40: their ranks add up to 80, above
    the engine's 64, which the request is told when it is added (it was accepted, then aborted at load)."""
    from data_plane.engine.errors import InvalidRequest

    paths = [
        write_peft_adapter(
            tiny_llama.model_dir,
            tmp_path / f"p{i}",
            20 + i,
            r=4,
            target_modules=ALL_SEVEN,
            rank_pattern={"q_proj": 40},
        )
        for i in range(2)
    ]
    engine = make_engine(tiny_llama)
    refs = [AdapterRef(key=digest_dir(p), path=p, weight=0.5) for p in paths]
    with pytest.raises(InvalidRequest, match="add up to 80"):
        engine.add_request(greedy("mix", [1, 2, 3], refs))


@pytest.mark.parametrize(
    "regex",
    [
        ".*",
        r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)|lm_head",
        r"model\.layers\.\d+(\..*)?",
        r".*(proj|norm)",
        r".*self_attn.*|.*mlp\..*",
    ],
)
def test_a_regex_that_selects_a_module_other_than_the_projections_is_refused(tiny_llama, tmp_path, regex):
    """PEFT wraps such a module (lm_head) or refuses it (the model, a layer, a norm): never the plain LoRA
    of these weights."""
    adapter = _with_config(tiny_llama.adapter_dirs["r8_all"], tmp_path / "edited", target_modules=regex)
    with pytest.raises(AdapterFormatError) as refused:
        validate_adapter_dir(adapter)
    assert refused.value.field == "adapter_config.json.target_modules"
    assert "selects" in refused.value.reason and "LoRA does not apply to here" in refused.value.reason


def _spec(model):
    import json

    from openlora.base_model import BaseModelSpec

    return BaseModelSpec.from_hf_config(json.loads((model.model_dir / "config.json").read_text()), "tiny")


def _without_layer(src: Path, dst: Path, layer: int, **changes) -> Path:
    from safetensors.torch import load_file, save_file

    adapter = _with_config(src, dst, **changes)
    weights = adapter / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_file(weights).items() if f".layers.{layer}." not in k}
    save_file(tensors, weights)
    return adapter


@pytest.mark.parametrize("init", [False, None, "orthogonal"])
def test_a_selected_module_without_weights_is_refused_when_peft_would_start_it_random(
    tiny_llama, tmp_path, init
):
    adapter = _without_layer(
        tiny_llama.adapter_dirs["r8_all"], tmp_path / "edited", 1, init_lora_weights=init
    )
    with pytest.raises(AdapterFormatError) as refused:
        validate_adapter_dir(adapter, _spec(tiny_llama))  # the layer count comes from the base model
    assert refused.value.field == "adapter_model.safetensors"
    assert "layer 1" in refused.value.reason and "holds no lora_A / lora_B" in refused.value.reason


def test_a_selected_module_without_weights_is_served_as_peft_when_peft_starts_it_at_zero(
    tiny_llama, tmp_path
):
    """init_lora_weights true (PEFT's default), "gaussian": lora_B starts at zero, so a module the file
    holds nothing for adds nothing under PEFT either."""
    engine = make_engine(tiny_llama)
    rng = random.Random(3)
    adapters = {}
    for init in (True, "gaussian"):
        path = _without_layer(
            tiny_llama.adapter_dirs["r8_all"], tmp_path / str(init), 1, init_lora_weights=init
        )
        validate_adapter_dir(path, _spec(tiny_llama))
        adapters[str(init)] = (path, [rng.randrange(tiny_llama.vocab_size) for _ in range(9)])
        engine.add_request(greedy(str(init), adapters[str(init)][1], [_ref(path)]))
    results = run_to_completion(engine)
    for name, (path, prompt) in adapters.items():
        want_tokens, _ = reference_greedy(load_reference(tiny_llama.model_dir, [path]), prompt)
        assert results[name][0] == want_tokens, name


def test_init_and_all_linear_are_read_as_peft_reads_them(tiny_llama, tmp_path):
    """PEFT lowercases target_modules "all-linear" and init "gaussian", and compares "eva" exactly (it
    refuses "EVA")."""
    spec = _spec(tiny_llama)
    src = tiny_llama.adapter_dirs["r8_all"]
    validate_adapter_dir(_with_config(src, tmp_path / "upper", target_modules="ALL-LINEAR"), spec)
    validate_adapter_dir(_without_layer(src, tmp_path / "gauss", 1, init_lora_weights="Gaussian"), spec)
    validate_adapter_dir(_without_layer(src, tmp_path / "eva", 1, init_lora_weights="eva"), spec)
    with pytest.raises(AdapterFormatError) as refused:
        validate_adapter_dir(_without_layer(src, tmp_path / "EVA", 1, init_lora_weights="EVA"), spec)
    assert refused.value.field == "adapter_model.safetensors"
