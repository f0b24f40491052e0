"""Promise: every parser of outside input either returns a valid result or refuses with its domain error
naming the field at fault; never another exception (RecursionError, OverflowError, TypeError, ...).

Each parser gets random bytes, random JSON-ish documents, mutations of a valid input and hand-made
adversarial cases: nesting 10^5 deep, huge and non-finite numbers, wrong types, duplicate keys,
truncated files and safetensors headers whose offsets lie."""

from __future__ import annotations

import base64
import json
import math
import shutil
import struct
import tempfile
import uuid
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from control_plane.errors import InvalidArgument
from control_plane.registry.page_token import decode_page_token, encode_page_token
from control_plane.registry.service import ADAPTER_NAME
from data_plane.adapters.peft_reader import read_peft_adapter
from data_plane.engine.errors import AdapterLoadError, InvalidRequest
from data_plane.engine.request import AdapterRef, EngineRequest
from data_plane.engine.validation import validate_request
from data_plane.model.config import ModelConfig
from data_plane.model.loader import CheckpointError, checkpoint_files
from data_plane.server.validation import RequestFieldError, RequestLimits, ValidRequest, check_request
from openlora.adapter_format import (
    AdapterFormatError,
    AdapterInfo,
    parse_adapter_config,
    validate_adapter_dir,
)
from openlora.base_model import BaseModelSpec, UnsupportedModelError
from openlora.config import read_context
from openlora.peft_targets import TargetError, TargetRule
from openlora.safe_json import JsonFieldError, load_json
from openlora.v1 import inference_pb2

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
DEEP = 100_000
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
}
SPEC = BaseModelSpec.from_hf_config(TINY_LLAMA, "tiny-llama")
LIMITS = RequestLimits(max_tokens_limit=256, default_max_tokens=16, vocab_size=128, max_model_len=64)

# JSON-ish values: every JSON type, non-finite and huge numbers, unicode, nested a few levels.
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats()
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


def _dumps(value: object) -> bytes:
    """json.dumps that keeps NaN/Infinity literals and surrogates (both must be refused, not crash)."""
    return json.dumps(value).encode("utf-8", "surrogatepass")


def deep(kind: str = "[", depth: int = DEEP) -> bytes:
    if kind == "[":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


def names_field(error: Exception, field: str) -> bool:
    return field in str(error)


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    out = tmp_path_factory.mktemp("peft")
    model.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)
    return out


@pytest.fixture(scope="module")
def scratch() -> Path:
    path = Path(tempfile.mkdtemp(prefix="parser-fuzz-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# --- the safe JSON loader -------------------------------------------------------------------------


@FUZZ
@given(data=st.binary(max_size=200) | json_values.map(_dumps))
def test_load_json_returns_a_value_or_refuses_naming_the_field(data):
    try:
        load_json(data, "doc")
    except JsonFieldError as e:
        assert e.field == "doc" and str(e).startswith("doc: ")


@pytest.mark.parametrize(
    "text, reason",
    [
        (deep("["), "nested deeper"),
        (deep("{"), "nested deeper"),
        (b"[" * 40 + b"]" * 40, "nested deeper"),
        (b'{"a": NaN}', "NaN"),
        (b'{"a": -Infinity}', "Infinity"),
        (b'{"a": 1e400}', "out of range"),
        (b'{"a": 1' + b"0" * 5000 + b"}", "out of range"),
        (b'{"a": 1, "a": 2}', "duplicate key"),
        (b'"\\ud800"', "UTF-8"),
        (b"\xff\xfe{}", "UTF-8"),
        (b"", "not valid JSON"),
    ],
)
def test_load_json_refuses_adversarial_documents_with_the_reason(text, reason):
    with pytest.raises(JsonFieldError, match=reason):
        load_json(text, "doc")


# --- adapter_config.json --------------------------------------------------------------------------


def _check_config(data: bytes) -> None:
    try:
        config = parse_adapter_config(data)
    except AdapterFormatError as e:
        assert e.field.startswith(CONFIG) and names_field(e, e.field)
        return
    assert type(config["r"]) is int and config["r"] >= 1
    assert type(config["lora_alpha"]) is float and math.isfinite(config["lora_alpha"])
    assert type(config["use_rslora"]) is bool


@FUZZ
@given(data=st.binary(max_size=300) | json_values.map(_dumps))
def test_adapter_config_of_random_bytes_and_json_is_parsed_or_refused(data):
    _check_config(data)


@FUZZ
@given(
    key=st.sampled_from(["r", "lora_alpha", "use_rslora", "target_modules", "peft_type", "bias", "use_dora"]),
    value=json_values,
)
def test_adapter_config_with_any_value_in_a_known_field_is_parsed_or_refused(key, value):
    _check_config(_dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, key: value}))


_MODULE_NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.3.mlp.down_proj", "lm_head", ""]


@FUZZ
@given(
    values=st.dictionaries(
        st.sampled_from(["target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"]),
        json_values | st.sampled_from(["", [], "all-linear", ".*", "q_proj", ["q_proj"], [0, 1], "layers"]),
    )
)
def test_target_selection_of_any_config_values_selects_or_is_refused_by_key(values):
    """The selection rule (applied as an upload's tensors are checked, after the config parsed) either
    answers for every module name or refuses naming its key: `target_modules: []` failed with an
    AttributeError that reached the caller as INTERNAL."""
    try:
        rule = TargetRule(values)
        for name in _MODULE_NAMES:
            assert rule.leaves_out(name) in (None, *values, "target_modules", "layers_pattern")
    except TargetError as refused:
        assert refused.key in values


@pytest.mark.parametrize("empty", [[], ""])
def test_empty_target_modules_select_nothing_and_are_refused(empty):
    with pytest.raises(TargetError) as refused:
        TargetRule({"target_modules": empty})
    assert refused.value.key == "target_modules" and "selects no module" in refused.value.reason


@pytest.mark.parametrize(
    "text, field",
    [
        (b'{"r": 8, "x": ' + deep("[", 30_000) + b"}", CONFIG),
        (b'{"r": "8"}', "r"),
        (b'{"r": true}', "r"),
        (b'{"r": 8.0}', "r"),
        (b'{"r": 1e400}', CONFIG),
        (b'{"r": 100000000000000000000000}', CONFIG),
        (b'{"r": 8, "lora_alpha": 1' + b"0" * 400 + b"}", CONFIG),
        (b'{"r": 8, "lora_alpha": NaN}', CONFIG),
        (b'{"peft_type": "LORA", "r": 8, "lora_alpha": true}', "lora_alpha"),
        (b'{"peft_type": "LORA", "r": 8, "use_rslora": "false"}', "use_rslora"),
        (b'{"peft_type": "LORA", "r": 8, "target_modules": [{"a": 1}]}', "target_modules"),
        (b'{"r": 8, "r": 4}', CONFIG),
        (b'{"r": 8, "peft_type": ["LORA"]}', "peft_type"),
    ],
)
def test_adapter_config_adversarial_values_are_refused_naming_the_field(text, field):
    with pytest.raises(AdapterFormatError) as caught:
        parse_adapter_config(text)
    assert field in caught.value.field


# --- adapter_model.safetensors --------------------------------------------------------------------


def _header_and_data(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write_weights(directory: Path, header: object, data: bytes, header_len: int | None = None) -> None:
    encoded = _dumps(header) if not isinstance(header, bytes) else header
    length = len(encoded) if header_len is None else header_len
    (directory / WEIGHTS).write_bytes(struct.pack("<Q", length) + encoded + data)


def _check_adapter_dir(directory: Path) -> None:
    """The validator accepts or refuses naming a file; what it accepts, safetensors and the worker read."""
    try:
        info = validate_adapter_dir(directory, SPEC, max_rank=64)
    except AdapterFormatError as e:
        assert e.field in (CONFIG, WEIGHTS, "size_bytes") or e.field.startswith(CONFIG), e
        return
    assert isinstance(info, AdapterInfo)
    weights = read_peft_adapter(directory, SPEC, max_rank=64, dtype=torch.float32)
    assert weights.rank == info.rank


def _fresh(scratch: Path, peft_adapter: Path) -> Path:
    directory = scratch / uuid.uuid4().hex
    shutil.copytree(peft_adapter, directory)
    return directory


@FUZZ
@given(data=st.binary(max_size=400))
def test_weights_of_random_bytes_are_refused(scratch, peft_adapter, data):
    directory = _fresh(scratch, peft_adapter)
    (directory / WEIGHTS).write_bytes(data)
    _check_adapter_dir(directory)
    shutil.rmtree(directory)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    entry=st.integers(min_value=0, max_value=3),
    key=st.sampled_from(["dtype", "shape", "data_offsets", "__whole__"]),
    value=json_values
    | st.lists(st.integers(min_value=-(2**64), max_value=2**64), min_size=2, max_size=2)
    | st.sampled_from(["F64", "I8", "BOOL", "f32", "F16", "BF16", ""]),
)
def test_weights_with_a_lying_header_entry_are_refused_or_readable(scratch, peft_adapter, entry, key, value):
    directory = _fresh(scratch, peft_adapter)
    header, data = _header_and_data(directory / WEIGHTS)
    name = sorted(k for k in header if k != "__metadata__")[entry]
    if key == "__whole__":
        header[name] = value
    else:
        header[name] = {**header[name], key: value}
    _write_weights(directory, header, data)
    _check_adapter_dir(directory)
    shutil.rmtree(directory)


@FUZZ
@given(cut=st.integers(min_value=0, max_value=4000), extra=st.binary(max_size=16))
def test_truncated_or_padded_weights_are_refused_or_readable(scratch, peft_adapter, cut, extra):
    directory = _fresh(scratch, peft_adapter)
    raw = (directory / WEIGHTS).read_bytes()
    (directory / WEIGHTS).write_bytes(raw[: max(0, len(raw) - cut)] + extra)
    _check_adapter_dir(directory)
    shutil.rmtree(directory)


def _lying_headers(header: dict, data: bytes) -> dict[str, tuple[object, bytes, int | None]]:
    names = sorted(k for k in header if k != "__metadata__")
    first = names[0]

    def with_entry(**fields) -> dict:
        return {**header, first: {**header[first], **fields}}

    size = len(data)
    at_zero = next(k for k in names if header[k]["data_offsets"][0] == 0)
    end = header[at_zero]["data_offsets"][1]
    # Python reads `-0` as the integer 0; safetensors (serde_json) reads it as a float and refuses the file.
    negative_zero = _dumps(header).replace(
        _dumps({at_zero: header[at_zero]})[1:-1],
        _dumps({at_zero: header[at_zero]})[1:-1].replace(b"[0, %d]" % end, b"[-0, %d]" % end),
    )
    shifted = {
        k: v if k == "__metadata__" else {**v, "data_offsets": [o + 4 for o in v["data_offsets"]]}
        for k, v in header.items()
    }
    return {
        "deep nesting": (b'{"x": ' + deep("[") + b"}", data, None),
        "deep nesting under the limit": (b'{"x": ' + deep("[", 400_000) + b"}", data, None),
        "header length past the file": (header, data, 1 << 19),
        "header length 2**64-1": (header, data, 2**64 - 1),
        "negative offset": (with_entry(data_offsets=[-8, 0]), data, None),
        "huge offsets": (with_entry(data_offsets=[2**63, 2**64]), data, None),
        "offset past the end": (with_entry(data_offsets=[size - 4, size + 4]), data, None),
        "shape product overflow": (with_entry(shape=[2**62, 2**62]), data, None),
        "bool shape": (with_entry(shape=[True, 64]), data, None),
        "float shape": (with_entry(shape=[4.0, 64.0]), data, None),
        "dtype list": (with_entry(dtype=["F32"]), data, None),
        "dtype unknown": (with_entry(dtype="F8_E4M3"), data, None),
        "duplicate tensor": (
            b"{" + b",".join(json.dumps({first: header[first]})[1:-1].encode() for _ in range(2)) + b"}",
            data,
            None,
        ),
        "metadata not strings": ({**header, "__metadata__": {"format": 1}}, data, None),
        "metadata deep": ({**header, "__metadata__": {"a": [[["x"]]]}}, data, None),
        "gap before the data": (shifted, b"\0" * 4 + data, None),
        "layer number of 5000 digits": (
            {**header, first.replace("layers.0.", "layers." + "1" * 5000 + "."): header[first]},
            data,
            None,
        ),
        # PEFT loads nothing from it (no module's key ends in a newline) and serves the module's own start;
        # the worker read it by its name and served its weights.
        "offset written -0": (negative_zero, data, None),
        "tensor name ending in a newline": (
            {(f"{k}\n" if k == first else k): v for k, v in header.items()},
            data,
            None,
        ),
        "NaN in the header": (b'{"x": NaN}', data, None),
        "not utf-8": (b'{"\xff": 1}', data, None),
    }


CASES = [
    "deep nesting",
    "deep nesting under the limit",
    "header length past the file",
    "header length 2**64-1",
    "negative offset",
    "huge offsets",
    "offset past the end",
    "shape product overflow",
    "bool shape",
    "float shape",
    "dtype list",
    "dtype unknown",
    "duplicate tensor",
    "metadata not strings",
    "metadata deep",
    "gap before the data",
    "layer number of 5000 digits",
    "offset written -0",
    "tensor name ending in a newline",
    "NaN in the header",
    "not utf-8",
]


@pytest.mark.parametrize("case", CASES)
def test_lying_safetensors_headers_are_refused_naming_the_weights_file(tmp_path, peft_adapter, case):
    directory = tmp_path / "a"
    shutil.copytree(peft_adapter, directory)
    header, data = _header_and_data(directory / WEIGHTS)
    fake_header, fake_data, header_len = _lying_headers(header, data)[case]
    _write_weights(directory, fake_header, fake_data, header_len)
    with pytest.raises(AdapterFormatError) as caught:
        validate_adapter_dir(directory, SPEC)
    assert caught.value.field == WEIGHTS
    with pytest.raises(AdapterLoadError, match=WEIGHTS):
        read_peft_adapter(directory, SPEC, max_rank=64, dtype=torch.float32)


def test_the_valid_adapter_is_accepted_and_read(peft_adapter):
    info = validate_adapter_dir(peft_adapter, SPEC)
    assert info.rank == 4 and info.target_modules == ("q_proj", "v_proj")
    assert read_peft_adapter(peft_adapter, SPEC, max_rank=64, dtype=torch.float32).rank == 4


# --- page tokens ----------------------------------------------------------------------------------


def _check_token(token: str) -> None:
    try:
        name, adapter_id = decode_page_token(token, ADAPTER_NAME)
    except InvalidArgument as e:
        assert e.field == "page_token" and "page_token" in str(e)
        return
    assert ADAPTER_NAME.fullmatch(name) and isinstance(adapter_id, uuid.UUID)
    assert encode_page_token(name, adapter_id) == token


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode()


@FUZZ
@given(
    token=st.text(max_size=80)
    | st.binary(max_size=200).map(_b64)
    | json_values.map(lambda v: _b64(_dumps(v)))
    | st.tuples(json_values, json_values).map(lambda v: _b64(_dumps(list(v))))
)
def test_page_token_of_anything_is_decoded_or_refused_naming_page_token(token):
    _check_token(token)


@FUZZ
@given(
    name=st.from_regex(r"[A-Za-z0-9_.-]{1,128}", fullmatch=True).filter(ADAPTER_NAME.fullmatch),
    adapter_id=st.uuids(),
)
def test_page_token_round_trips(name, adapter_id):
    assert decode_page_token(encode_page_token(name, adapter_id), ADAPTER_NAME) == (name, adapter_id)


@pytest.mark.parametrize(
    "token",
    [
        _b64(deep("[")),
        _b64(deep("[", 2_000)),
        _b64(b'["a", ' + deep("[", 50) + b"]"),
        _b64(b'["a", "00000000-0000-0000-0000-000000000000", 1e400]'),
        _b64(b'[NaN, "00000000-0000-0000-0000-000000000000"]'),
        _b64(b'["a", "{00000000-0000-0000-0000-000000000000}"]'),
        _b64(b'["a", "00000000000000000000000000000000"]'),
        _b64(json.dumps(["a", str(uuid.UUID(int=1))]).encode()) + "\n",
        "A" * 100_000,
        "ünï",
    ],
)
def test_adversarial_page_tokens_are_refused_naming_page_token(token):
    with pytest.raises(InvalidArgument, match="page_token"):
        decode_page_token(token, ADAPTER_NAME)


# --- GenerateRequest fields -----------------------------------------------------------------------

floats32 = st.floats(width=32)
generate_requests = st.builds(
    inference_pb2.GenerateRequest,
    request_id=st.text(max_size=140),
    adapter=st.text(max_size=8),
    prompt=st.text(max_size=20),
    prompt_token_ids=st.lists(st.integers(min_value=-(2**31), max_value=2**31 - 1), max_size=70),
    sampling=st.builds(
        inference_pb2.SamplingParams,
        temperature=floats32,
        top_p=floats32,
        top_k=st.integers(min_value=-(2**31), max_value=2**31 - 1),
        max_tokens=st.integers(min_value=-(2**31), max_value=2**31 - 1),
        seed=st.integers(min_value=0, max_value=2**64 - 1),
        stop=st.lists(st.text(max_size=300), max_size=18),
        repetition_penalty=floats32,
    ),
    logprobs=st.booleans(),
    mix=st.lists(
        st.builds(inference_pb2.AdapterWeight, adapter=st.text(max_size=6), weight=floats32), max_size=10
    ),
    mix_method=st.integers(min_value=-5, max_value=50),
)


@settings(max_examples=300, deadline=None)
@given(request=generate_requests)
def test_generate_request_of_any_fields_is_valid_or_refused_naming_the_field(request):
    try:
        valid = check_request(request, LIMITS)
    except RequestFieldError as e:
        assert e.field and str(e).startswith(e.field)
        return
    assert isinstance(valid, ValidRequest)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=st.binary(max_size=200) | json_values.map(_dumps), weight=st.floats())
def test_engine_request_with_any_adapter_config_is_accepted_or_refused(scratch, config, weight):
    directory = scratch / uuid.uuid4().hex
    directory.mkdir()
    (directory / CONFIG).write_bytes(config)
    request = EngineRequest("r", [1, 2, 3], adapters=(AdapterRef("k", directory, weight),))
    try:
        validate_request(request, vocab_size=128, max_model_len=64, max_lora_rank=64, has_tokenizer=True)
    except (InvalidRequest, AdapterLoadError) as e:
        assert e.field and str(e).startswith(e.field)
    shutil.rmtree(directory)


# --- base model config.json, checkpoint index, CLI context file --------------------------------


def _check_model_dir(directory: Path) -> None:
    try:
        config = ModelConfig.from_dir(directory)
    except UnsupportedModelError as e:
        assert "config.json" in str(e)
        return
    assert isinstance(config, ModelConfig) and config.max_model_len >= 1


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    key=st.sampled_from(
        [
            "architectures",
            "hidden_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "vocab_size",
            "rope_scaling",
            "rope_theta",
            "eos_token_id",
            "sliding_window",
            "use_sliding_window",
            "max_window_layers",
            "layer_types",
            "tie_word_embeddings",
            "max_position_embeddings",
            "rms_norm_eps",
            "hidden_act",
        ]
    ),
    value=json_values,
    generation=st.none() | json_values.map(_dumps) | st.binary(max_size=40),
)
def test_model_config_with_any_value_is_parsed_or_refused_naming_the_file(scratch, key, value, generation):
    directory = scratch / uuid.uuid4().hex
    directory.mkdir()
    (directory / "config.json").write_bytes(_dumps({**TINY_LLAMA, key: value}))
    if generation is not None:
        (directory / "generation_config.json").write_bytes(generation)
    _check_model_dir(directory)
    shutil.rmtree(directory)


@pytest.mark.parametrize(
    "config",
    [
        deep("{"),
        _dumps({**TINY_LLAMA, "x": 1}).replace(b'"x": 1', b'"x": ' + deep("[")),
        _dumps({**TINY_LLAMA, "num_attention_heads": 0}),
        _dumps({**TINY_LLAMA, "hidden_size": "64"}),
        _dumps({**TINY_LLAMA, "vocab_size": True}),
        _dumps({**TINY_LLAMA, "rope_scaling": {"rope_type": "linear"}}),
        _dumps({**TINY_LLAMA, "rope_scaling": {"rope_type": ["llama3"]}}),
        _dumps({**TINY_LLAMA, "eos_token_id": [1, "2"]}),
        _dumps({**TINY_LLAMA, "architectures": [["LlamaForCausalLM"]]}),
        b"\xff",
    ],
)
def test_adversarial_model_configs_are_refused_naming_config_json(tmp_path, config):
    (tmp_path / "config.json").write_bytes(config)
    with pytest.raises(UnsupportedModelError, match=r"config\.json"):
        ModelConfig.from_dir(tmp_path)


@FUZZ
@given(index=st.binary(max_size=100) | json_values.map(lambda v: _dumps({"weight_map": v})))
def test_checkpoint_index_is_parsed_or_refused_and_never_leaves_the_directory(scratch, index):
    directory = scratch / uuid.uuid4().hex
    directory.mkdir()
    (directory / "model.safetensors.index.json").write_bytes(index)
    try:
        files = checkpoint_files(directory)
    except CheckpointError as e:
        assert "model.safetensors.index.json" in str(e)
    else:
        assert all(f.parent == directory and f.name.endswith(".safetensors") for f in files)
    shutil.rmtree(directory)


@pytest.mark.parametrize(
    "weight_map",
    [{"a": "../../outside.safetensors"}, {"a": "/etc/passwd"}, {"a": "sub/x.safetensors"}, {"a": 7}, []],
)
def test_checkpoint_index_naming_a_file_outside_the_directory_is_refused(tmp_path, weight_map):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="weight_map"):
        checkpoint_files(tmp_path)


@FUZZ
@given(data=st.binary(max_size=100) | json_values.map(_dumps))
def test_context_file_of_anything_reads_as_string_settings(scratch, data):
    path = scratch / "context.json"
    path.write_bytes(data)
    context = read_context({"OPENLORA_CONTEXT": str(path)})
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in context.items())


def test_deeply_nested_context_file_reads_as_empty(tmp_path):
    path = tmp_path / "context.json"
    path.write_bytes(b'{"target": ' + deep("[") + b"}")
    assert read_context({"OPENLORA_CONTEXT": str(path)}) == {}
