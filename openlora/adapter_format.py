"""Validation of PEFT LoRA adapter directories, without torch and without trusting the input.

Both the control plane (on upload) and the worker (before a load) call `validate_adapter_dir`. It reads
the safetensors header with a bounded length, maps every tensor name to the LoRA A/B of a known
projection, checks shapes against the rank and the base model, dtypes, finiteness of every value,
rank and size limits, and refuses configs that could make a loader run code. Pickle files are never
opened: any file other than the two PEFT files is refused by name.
"""

from __future__ import annotations

import itertools
import math
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from openlora.artifact import ARTIFACT_FILES, CONFIG_FILE, WEIGHTS_FILE
from openlora.base_model import PROJECTIONS, BaseModelSpec
from openlora.peft_targets import ALL_LINEAR, TargetError, TargetRule
from openlora.regex_limits import RegexRefused, compile_bounded
from openlora.safe_json import JsonFieldError, describe, is_int, load_json, load_json_object

MAX_HEADER_BYTES = 1 << 20
MAX_CONFIG_BYTES = 64 << 10
DEFAULT_MAX_RANK = 64
DEFAULT_MAX_SIZE_BYTES = 512 << 20
# Bound on `r` before the configured maximum is applied: keeps every later product small.
MAX_CONFIG_RANK = 1 << 16
MAX_PATTERN_KEYS = 1024  # entries of rank_pattern / alpha_pattern
# Matching time one pattern option may take over all of an adapter's modules (1,024 plain keys against the
# 224 modules of a 32-layer model take about 0.3 s on an idle 2-core machine).
PATTERN_MATCH_BUDGET_S = 2.0
# A safetensors header is {name: {dtype, shape: [...], data_offsets: [...]}, __metadata__: {str: str}}.
_HEADER_DEPTH = 3
_CONFIG_DEPTH = 8

# Safetensors dtype -> (bytes per element, unsigned view, exponent shift, exponent mask).
# A value is not finite exactly when all its exponent bits are set.
_DTYPES: dict[str, tuple[int, type, int, int]] = {
    "F32": (4, np.uint32, 23, 0xFF),
    "F16": (2, np.uint16, 10, 0x1F),
    "BF16": (2, np.uint16, 7, 0xFF),
}
# The names PEFT's loader maps onto the model's LoRA weights (`set_peft_model_state_dict` inserts the adapter
# name, "default", after `lora_A` / `lora_B`; a name already holding "default" is loaded too). Any other
# adapter name there, a layer index with a leading zero, or anything after `.weight` (a newline), names no
# module: PEFT loads nothing from such a tensor and serves the base model's projection.
_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(?P<layer>0|[1-9][0-9]{0,4})\.(?:self_attn|mlp)\."
    r"(?P<module>[a-z_]+)\.lora_(?P<which>[AB])(?:\.default)?\.weight$"
)
_MODULE_PARENT = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
_CODE_KEYS = ("auto_map", "custom_code", "trust_remote_code")
_BIAS_VALUES = ("none", "all", "lora_only")  # LoraConfig.bias
# Modules of the served architectures' transformers models besides the seven projections.
_OTHER_MODULES = frozenset(
    {
        "model", "embed_tokens", "layers", "self_attn", "mlp", "act_fn", "rotary_emb", "input_layernorm",
        "post_attention_layernorm", "norm", "lm_head", "q_norm", "k_norm",
    }
)  # fmt: skip
# init_lora_weights values whose initialization subtracts the adapter's start from the base weights (PiSSA,
# CorDA, OLoRA, LoRA-GA) or replaces them with a quantized residual (LoftQ): such an adapter, saved as it is,
# only fits that changed base. PEFT's conversion on save writes a plain LoRA (and init_lora_weights true).
_BASE_CHANGING_INITS = ("pissa", "corda", "olora", "lora_ga", "loftq")
# LoraConfig options (PEFT 0.21) that change what the adapter computes beyond B @ A on the seven projections:
# refused whenever set, naming the option, since applying the plain LoRA would serve a different model.
_UNSUPPORTED_OPTIONS = (
    ("use_dora", "DoRA"),
    ("modules_to_save", "modules_to_save"),
    ("lora_bias", "lora_bias (a bias on lora_B)"),
    ("trainable_token_indices", "trainable_token_indices (trained embedding rows)"),
    ("layer_replication", "layer_replication"),
    (
        "alora_invocation_tokens",
        "aLoRA (activated LoRA: the adapter applies only after its invocation tokens)",
    ),
    ("target_parameters", "target_parameters (LoRA on parameters rather than on modules)"),
    ("use_bdlora", "BD-LoRA (block-diagonal LoRA)"),
    ("velora_config", "VeLoRA"),
    ("monteclora_config", "MonteCLoRA"),
    ("kasa_config", "KaSA"),
    ("arrow_config", "Arrow routing"),
    ("megatron_config", "Megatron-sharded LoRA layers"),
)
# Of those, the ones PEFT switches on by any value but null: it builds its variant's config object from
# whatever is there, `{}` (every default) included, or refuses the value; the others by a true value.
_ON_UNLESS_NULL = frozenset(
    {
        "alora_invocation_tokens",
        "use_bdlora",
        "velora_config",
        "monteclora_config",
        "kasa_config",
        "arrow_config",
    }
)
# Options this server reads or checks itself, and options that cannot change a plain LoRA's output at
# inference (initialization settings, dropout, bookkeeping). Any other key is refused unless it is empty
# (null, false, {} or []): a key from a newer PEFT may be a variant this server would serve silently wrong.
_KNOWN_OPTIONS = frozenset(
    {
        "r", "lora_alpha", "use_rslora", "target_modules", "exclude_modules", "layers_to_transform",
        "layers_pattern", "rank_pattern", "alpha_pattern", "bias", "init_lora_weights", "peft_type",
        "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
        "lora_dropout", "fan_in_fan_out", "megatron_core", "loftq_config", "eva_config", "corda_config",
        "lora_ga_config", "use_qalora", "qalora_group_size", "runtime_config", "ensure_weight_tying",
    }
)  # fmt: skip
# PEFT's TaskType values (0.21).
_PEFT_TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
# The largest factor an adapter may apply to B @ A (alpha / r, or alpha / sqrt(r)); PEFT's default is 1.
MAX_LORA_SCALING = 1e4
# PEFT's LoraConfig defaults for a config that does not say (its save_pretrained always writes the keys).
PEFT_DEFAULT_ALPHA = 8.0
PEFT_DEFAULT_RANK = 8
_FINITE_CHUNK_ELEMENTS = 1 << 22
# Files PEFT's save_pretrained writes beside the adapter that carry no weights; never read or uploaded.
IGNORED_FILES = ("README.md",)


class AdapterFormatError(ValueError):
    """An adapter directory was refused. `field` names the file or config key at fault."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class TensorInfo:
    name: str
    layer: int
    module: str
    which: str  # "A" (r, in) or "B" (out, r)
    dtype: str
    shape: tuple[int, ...]
    begin: int  # byte offset within the data section
    end: int


@dataclass(frozen=True)
class AdapterInfo:
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    layers: tuple[int, ...]
    dtype: str
    size_bytes: int
    tensors: tuple[TensorInfo, ...]
    # ((layer, module), scaling) of the modules whose rank or alpha a rank_pattern / alpha_pattern sets.
    module_scalings: tuple[tuple[tuple[int, str], float], ...] = ()
    # The config's `r`: the rank of every module no rank_pattern names (`rank` is the largest of all).
    default_rank: int | None = None

    @property
    def scaling(self) -> float:
        """The factor PEFT applies to B @ A of a module no pattern names: alpha / r, or alpha / sqrt(r)
        with rsLoRA."""
        return lora_scaling(self.alpha, self.default_rank or self.rank, self.use_rslora)

    def scaling_of(self, layer: int, module: str) -> float:
        """The factor PEFT applies to this module's B @ A (its own rank and alpha under the patterns)."""
        for key, scaling in self.module_scalings:
            if key == (layer, module):
                return scaling
        return self.scaling


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def parse_adapter_config(data: bytes) -> dict:
    """Parses and checks `adapter_config.json`; returns the dict with `r` (int), `lora_alpha` (float),
    `use_rslora` (bool) and `target_modules` (list of names, a string or None) checked and filled in."""
    try:
        config = load_json_object(data, CONFIG_FILE, max_depth=_CONFIG_DEPTH, max_bytes=MAX_CONFIG_BYTES)
        for key in _CODE_KEYS:
            if config.data.get(key):
                raise JsonFieldError(config.field(key), "code references are not allowed")
        # PEFT reads peft_type to pick the config class (a KeyError when absent or not an exact member name)
        # and refuses a task_type outside its TaskType.
        peft_type = config.get_str("peft_type", max_chars=64)
        if peft_type != "LORA":
            raise JsonFieldError(config.field("peft_type"), f"{describe(peft_type)} is not LORA")
        task_type = config.get_str("task_type", None, max_chars=64)
        if task_type is not None and task_type not in _PEFT_TASK_TYPES:
            raise JsonFieldError(
                config.field("task_type"),
                f"{describe(task_type)} is not one of PEFT's {list(_PEFT_TASK_TYPES)}",
            )
        rank = config.get_int("r", PEFT_DEFAULT_RANK, lo=1, hi=MAX_CONFIG_RANK)
        # Any finite alpha, as PEFT takes it: a negative one scales B @ A by a negative factor, 0 turns the
        # module off; only the factor's size is bounded (MAX_LORA_SCALING).
        alpha = config.get_number("lora_alpha", PEFT_DEFAULT_ALPHA)
        use_rslora = config.get_bool("use_rslora", False)
        # PEFT options that change the model beyond LoRA on the seven projections: weights this server does
        # not apply (a bias on lora_B, trained embedding rows, whole modules), layers it does not have, or
        # LoRA variants that compute something else.
        for key, what in _UNSUPPORTED_OPTIONS:
            value = config.data.get(key)
            if value is not None if key in _ON_UNLESS_NULL else value:
                raise JsonFieldError(config.field(key), f"{what} is not supported")
        unsupported = {key for key, _ in _UNSUPPORTED_OPTIONS}
        for key, value in config.data.items():
            # `{}` counts as set: PEFT turns a sub-config's `{}` into its variant with every default.
            if key not in _KNOWN_OPTIONS and key not in unsupported and value not in (None, False, []):
                raise JsonFieldError(
                    config.field(key),
                    f"unknown option set to {describe(value)}: it may be a LoRA variant this server does not "
                    "apply (options it knows are those of PEFT's LoraConfig up to 0.21)",
                )
        init = config.data.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
            raise JsonFieldError(
                config.field("init_lora_weights"),
                f"{describe(init)} adapters are trained on a base model PEFT changed at initialization, not "
                "the one served here; save the adapter with save_pretrained(..., "
                "path_initial_model_for_weight_conversion=...) to turn it into a plain LoRA of the original base",
            )
        rank_pattern = _pattern(config, "rank_pattern", lambda v: is_int(v) and 1 <= v <= MAX_CONFIG_RANK)
        alpha_pattern = _pattern(
            config,
            "alpha_pattern",
            lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v),
        )
        # bias "all" / "lora_only" trains the base model's biases: PEFT saves them only where the base has
        # some (a `.bias` tensor, refused by name below); on a base without biases the file is a plain LoRA.
        bias = config.get_str("bias", "none", max_chars=16)
        if bias not in _BIAS_VALUES:
            raise JsonFieldError(config.field("bias"), f"{describe(bias)} is not one of {list(_BIAS_VALUES)}")
        targets = config.data.get("target_modules")
        if isinstance(targets, list):
            # PEFT matches an entry against a module's name or its end: `q_proj`, `self_attn.q_proj`, and the
            # full names `target_modules="all-linear"` is saved as (`model.layers.0.self_attn.q_proj`). An
            # entry naming no module of the model is ignored by PEFT (lists written for several
            # architectures: `c_attn`, `query_key_value`), one naming a module other than the seven
            # projections would be wrapped by PEFT (lm_head) or make it fail: refused.
            if not all(isinstance(t, str) for t in targets):
                raise JsonFieldError(config.field("target_modules"), "must be a list of module names")
            other = [t for t in targets if _names_other_module(t)]
            if other:
                raise JsonFieldError(
                    config.field("target_modules"),
                    f"names modules other than the projections LoRA applies to here: {describe(other)}; "
                    f"supported: {list(PROJECTIONS)}",
                )
        elif targets is not None and not isinstance(targets, str):
            raise JsonFieldError(config.field("target_modules"), "must be a list of module names")
        _check_layer_options(config, targets)
    except JsonFieldError as e:
        raise AdapterFormatError(e.field, e.reason) from None
    return {
        **config.data,
        "r": rank,
        "lora_alpha": alpha,
        "use_rslora": use_rslora,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
    }


def _check_layer_options(config, targets: object) -> None:
    """PEFT's own rules for the layer options (`LoraConfig.__post_init__`), whose breach it refuses: a
    regular expression in target_modules selects layers itself, and layers_pattern only narrows
    layers_to_transform."""
    layers, pattern = config.data.get("layers_to_transform"), config.data.get("layers_pattern")
    if isinstance(targets, str) and layers is not None:
        raise JsonFieldError(
            config.field("layers_to_transform"), "cannot be used when target_modules is a regular expression"
        )
    if isinstance(targets, str) and pattern is not None:
        raise JsonFieldError(
            config.field("layers_pattern"), "cannot be used when target_modules is a regular expression"
        )
    if pattern and layers is None:
        raise JsonFieldError(config.field("layers_pattern"), "needs layers_to_transform")


def _names_other_module(entry: str) -> bool:
    """True when a target_modules entry's last name is a module of a Llama, Mistral, Qwen2 or Qwen3 model
    other than the seven projections (`lm_head`, `embed_tokens`, `self_attn`, a layer's index, ...)."""
    last = entry.rsplit(".", 1)[-1]
    return last in _OTHER_MODULES or last.isdigit()


def _pattern(config, key: str, valid_value) -> dict:
    """`rank_pattern` or `alpha_pattern`: key -> value, for the modules that differ from `r` or
    `lora_alpha`. PEFT reads each key as a regular expression that must match the end of a module's name
    after a dot (`q_proj`, `model.layers.1.mlp.down_proj`, `layers\\.[01]\\..*`): each must compile; it is
    matched by `PatternMatcher` under a time budget."""
    raw = config.data.get(key)
    if raw is None or raw == {}:
        return {}
    if not isinstance(raw, dict):
        raise JsonFieldError(config.field(key), "must map module names to values")
    if len(raw) > MAX_PATTERN_KEYS:
        raise JsonFieldError(config.field(key), f"has {len(raw)} entries, more than {MAX_PATTERN_KEYS}")
    for name, value in raw.items():
        _pattern_regex(config.field(key), name)
        if not valid_value(value):
            want = f"a rank from 1 to {MAX_CONFIG_RANK}" if key == "rank_pattern" else "a finite number"
            raise JsonFieldError(config.field(key), f"{describe(name)} maps to {describe(value)}, not {want}")
    return dict(raw)


def _pattern_regex(field: str, key: str):
    """PEFT's expression for a pattern key (`peft.utils.other.get_pattern_key`), compiled in the `regex`
    engine (which can stop a match at a deadline) once `re` accepts it and its size is bounded
    (`openlora.regex_limits`); raises JsonFieldError naming `field`. An empty key matches no module
    (only a name ending in a dot), as in PEFT, which saves and serves such an adapter."""
    try:
        return compile_bounded(rf"(.*\.)?({key})$")
    except RegexRefused as refused:
        raise JsonFieldError(field, f"key {describe(key)}: {refused}") from None


class PatternMatcher:
    """`rank_pattern` or `alpha_pattern` (config key `key`) compiled once: `value(module_name, default)` is
    the value of the first key (in the config's order) whose expression matches the whole name or its end
    after a dot, PEFT's rule, for a module named as PEFT names it (`model.layers.3.mlp.up_proj`), else
    `default`. Compiling per lookup cost a worker 20 s for 140 modules against a config of 4,096 keys (the
    regex cache thrashes). The keys are a tenant's expressions: the time one adapter's matches take
    together (the time inside the matches only) is bounded by PATTERN_MATCH_BUDGET_S, past which
    the adapter is refused (AdapterFormatError naming the key) rather than holding a control plane or
    worker thread while a crafted expression backtracks."""

    def __init__(self, pattern: dict, key: str) -> None:
        self._field = f"{CONFIG_FILE}.{key}"
        self._entries = [(_pattern_regex(self._field, k), value) for k, value in pattern.items()]
        self._spent_s = 0.0

    def value(self, module_name: str, default):
        for compiled, value in self._entries:
            remaining = PATTERN_MATCH_BUDGET_S - self._spent_s
            started = time.monotonic()
            try:
                if remaining <= 0:
                    raise TimeoutError
                matched = compiled.match(module_name, timeout=remaining)
            except TimeoutError:
                raise AdapterFormatError(
                    self._field,
                    f"matching its keys took more than {PATTERN_MATCH_BUDGET_S:g} s: simplify them",
                ) from None
            finally:
                self._spent_s += time.monotonic() - started
            if matched:
                return value
        return default


def read_safetensors_header(path: Path, max_header_bytes: int = MAX_HEADER_BYTES) -> tuple[dict, int]:
    """Returns (header, data_offset). Reads at most 8 + max_header_bytes bytes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise AdapterFormatError(WEIGHTS_FILE, "truncated: no header length")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > max_header_bytes:
            raise AdapterFormatError(WEIGHTS_FILE, f"header of {header_len} bytes exceeds {max_header_bytes}")
        if 8 + header_len > size:
            raise AdapterFormatError(WEIGHTS_FILE, "truncated: header runs past the end of the file")
        raw = f.read(header_len)
    try:
        # safetensors refuses a file whose data_offsets hold a `-0` (serde_json reads it as a float): the
        # upload was accepted and every worker then failed to open it.
        header = load_json(raw, WEIGHTS_FILE, max_depth=_HEADER_DEPTH, negative_zero_float=True)
    except JsonFieldError as e:
        raise AdapterFormatError(WEIGHTS_FILE, f"header is {e.reason}") from None
    if not isinstance(header, dict):
        raise AdapterFormatError(WEIGHTS_FILE, "header must be a JSON object")
    return header, 8 + header_len


def _check_metadata(metadata: object) -> None:
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterFormatError(WEIGHTS_FILE, "header __metadata__ must map names to strings")


def _tensor_info(name: str, entry: object, data_bytes: int) -> TensorInfo:
    match = _KEY.fullmatch(name)  # `match` took a name ending in a newline (`$` matches before one)
    if (
        match is None
        or match["module"] not in _MODULE_PARENT
        or f".{_MODULE_PARENT[match['module']]}." not in name
    ):
        if name.endswith(".bias"):
            raise AdapterFormatError(
                WEIGHTS_FILE,
                f"tensor {describe(name, max_chars=256)} is a bias of the base model, which PEFT trains with bias='all' or "
                "'lora_only': applying it would change the base model for this adapter; not supported",
            )
        raise AdapterFormatError(
            WEIGHTS_FILE,
            f"tensor {describe(name, max_chars=256)} is not the LoRA A/B of a supported projection",
        )
    where = f"tensor {describe(name)}"
    if not isinstance(entry, dict):
        raise AdapterFormatError(WEIGHTS_FILE, f"{where}: malformed header entry")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise AdapterFormatError(WEIGHTS_FILE, f"{where}: dtype {describe(dtype)} is not F16, BF16 or F32")
    if isinstance(shape, list) and len(shape) == 2 and all(is_int(d) for d in shape) and 0 in shape:
        raise AdapterFormatError(
            WEIGHTS_FILE, f"{where}: shape {shape} has a dimension of 0 (rank 0?): each must be at least 1"
        )
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or not all(is_int(d) and d > 0 for d in shape)
        or not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(is_int(o) for o in offsets)
    ):
        raise AdapterFormatError(WEIGHTS_FILE, f"{where}: malformed shape or data_offsets")
    begin, end = offsets
    if not 0 <= begin <= end <= data_bytes:
        raise AdapterFormatError(WEIGHTS_FILE, f"{where}: data lies outside the file (truncated?)")
    if end - begin != shape[0] * shape[1] * _DTYPES[dtype][0]:
        raise AdapterFormatError(WEIGHTS_FILE, f"{where}: byte length does not match its shape")
    return TensorInfo(
        name, int(match["layer"]), match["module"], match["which"], dtype, tuple(shape), begin, end
    )


def _tensor_infos(header: dict, data_bytes: int) -> list[TensorInfo]:
    """The LoRA tensors a header describes; their data must tile the data section exactly, as
    safetensors requires when it opens the file (no gap, no overlap, nothing after the last)."""
    if "__metadata__" in header:
        _check_metadata(header["__metadata__"])
    tensors = [
        _tensor_info(name, entry, data_bytes) for name, entry in header.items() if name != "__metadata__"
    ]
    if not tensors:
        raise AdapterFormatError(WEIGHTS_FILE, "holds no LoRA tensors")
    spans = sorted((t.begin, t.end, t.name) for t in tensors)
    if spans[0][0] != 0:
        raise AdapterFormatError(WEIGHTS_FILE, "data_offsets leave a gap at the start of the data")
    for (_, prev_end, prev_name), (begin, _, name) in itertools.pairwise(spans):
        if begin < prev_end:
            raise AdapterFormatError(
                WEIGHTS_FILE, f"tensors {describe(prev_name)} and {describe(name)} overlap"
            )
        if begin > prev_end:
            raise AdapterFormatError(
                WEIGHTS_FILE, f"data_offsets leave a gap between {describe(prev_name)} and {describe(name)}"
            )
    return tensors


def _check_finite(path: Path, data_offset: int, tensors: list[TensorInfo]) -> None:
    with open(path, "rb") as f:
        for t in tensors:
            itemsize, view, shift, mask = _DTYPES[t.dtype]
            f.seek(data_offset + t.begin)
            remaining = (t.end - t.begin) // itemsize
            while remaining:
                count = min(remaining, _FINITE_CHUNK_ELEMENTS)
                raw = f.read(count * itemsize)
                if len(raw) != count * itemsize:
                    raise AdapterFormatError(WEIGHTS_FILE, f"tensor {describe(t.name)}: truncated data")
                bits = np.frombuffer(raw, dtype=np.dtype(view).newbyteorder("<"))
                if np.any(((bits >> shift) & mask) == mask):
                    raise AdapterFormatError(
                        WEIGHTS_FILE, f"tensor {describe(t.name)}: holds NaN or infinite values"
                    )
                remaining -= count


def validate_adapter_dir(
    path: str | Path,
    spec: BaseModelSpec | None = None,
    max_rank: int = DEFAULT_MAX_RANK,
    max_size_bytes: int = DEFAULT_MAX_SIZE_BYTES,
    check_values: bool = True,
) -> AdapterInfo:
    """Checks a PEFT LoRA directory and returns what it holds; raises AdapterFormatError naming the field.

    `spec` (the base model) enables the shape and layer checks; `check_values` scans every value for
    NaN and infinity (a worker re-validating a digest-verified artifact may skip it).
    """
    root = Path(path)
    if not root.is_dir():
        raise AdapterFormatError("path", f"{root.name!r} is not a directory")
    names = sorted(p.name for p in root.iterdir() if p.name not in IGNORED_FILES)
    extra = [n for n in names if n not in ARTIFACT_FILES]
    if extra:
        raise AdapterFormatError(
            extra[0], f"unexpected file; an adapter holds only {' and '.join(ARTIFACT_FILES)}"
        )
    for required in ARTIFACT_FILES:
        if required not in names:
            raise AdapterFormatError(required, "missing")
    config_path, weights_path = root / CONFIG_FILE, root / WEIGHTS_FILE
    if config_path.is_symlink() or weights_path.is_symlink():
        raise AdapterFormatError("path", "symbolic links are not allowed")
    size_bytes = config_path.stat().st_size + weights_path.stat().st_size
    if size_bytes > max_size_bytes:
        raise AdapterFormatError("size_bytes", f"{size_bytes} bytes exceeds the limit of {max_size_bytes}")
    config = parse_adapter_config(config_path.read_bytes())
    rank, alpha, use_rslora = config["r"], float(config["lora_alpha"]), bool(config["use_rslora"])
    try:
        rank_pattern, alpha_pattern = (
            PatternMatcher(config["rank_pattern"], "rank_pattern"),
            PatternMatcher(config["alpha_pattern"], "alpha_pattern"),
        )
    except JsonFieldError as e:
        raise AdapterFormatError(e.field, e.reason) from None
    if rank > max_rank and not config["rank_pattern"]:
        raise AdapterFormatError(f"{CONFIG_FILE}.r", f"rank {rank} exceeds the maximum of {max_rank}")

    header, data_offset = read_safetensors_header(weights_path)
    data_bytes = weights_path.stat().st_size - data_offset
    tensors = _tensor_infos(header, data_bytes)
    if max(t.end for t in tensors) != data_bytes:
        raise AdapterFormatError(WEIGHTS_FILE, "file length does not match the header (truncated or padded)")

    pairs: dict[tuple[int, str], dict[str, TensorInfo]] = {}
    for t in tensors:
        slot = pairs.setdefault((t.layer, t.module), {})
        if t.which in slot:
            raise AdapterFormatError(
                WEIGHTS_FILE, f"two lora_{t.which} tensors for layer {t.layer} {t.module}"
            )
        slot[t.which] = t
    module_ranks: dict[tuple[int, str], int] = {}
    module_scalings: list[tuple[tuple[int, str], float]] = []
    try:  # PEFT builds LoRA only on the modules the config selects, and ignores other tensors of the file
        rule = TargetRule(config)
    except TargetError as e:
        raise AdapterFormatError(f"{CONFIG_FILE}.{e.key}", e.reason) from None
    left_out: dict[str, list[str]] = {}  # config key -> modules it leaves out whose weights the file holds
    for (layer, module), ab in sorted(pairs.items()):
        where = f"layer {layer} {module}"
        if set(ab) != {"A", "B"}:
            raise AdapterFormatError(WEIGHTS_FILE, f"{where}: needs both lora_A and lora_B")
        a, b = ab["A"], ab["B"]
        name = peft_module_name(a.name)
        try:
            key = rule.leaves_out(name)
        except TargetError as e:
            raise AdapterFormatError(f"{CONFIG_FILE}.{e.key}", e.reason) from None
        if key is not None:
            left_out.setdefault(key, []).append(name)
        from_pattern = rank_pattern.value(name, None)
        module_rank, source = (rank, "r") if from_pattern is None else (from_pattern, "rank_pattern")
        if a.shape[0] != module_rank or b.shape[1] != module_rank:
            raise AdapterFormatError(
                WEIGHTS_FILE,
                f"{where}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not have rank "
                f"{module_rank} ({CONFIG_FILE}.{source})",
            )
        if module_rank > max_rank:
            raise AdapterFormatError(
                f"{CONFIG_FILE}.{source}", f"{where}: rank {module_rank} exceeds the maximum of {max_rank}"
            )
        module_ranks[(layer, module)] = module_rank
        module_alpha = float(alpha_pattern.value(name, alpha))
        scaling = lora_scaling(module_alpha, module_rank, use_rslora)
        if abs(scaling) > MAX_LORA_SCALING:
            field = "alpha_pattern" if module_alpha != alpha else "lora_alpha"
            raise AdapterFormatError(
                f"{CONFIG_FILE}.{field}",
                f"{where}: scales B @ A by {scaling:.6g} (alpha {module_alpha:g}, rank {module_rank}), a "
                f"magnitude more than {MAX_LORA_SCALING:g}: no trained adapter needs it, and float32 "
                "overflows on the way",
            )
        if module_rank != rank or module_alpha != alpha:
            module_scalings.append(((layer, module), scaling))
        if spec is not None:
            if layer >= spec.num_layers:
                raise AdapterFormatError(
                    WEIGHTS_FILE, f"{where}: the base model has {spec.num_layers} layers"
                )
            in_features, out_features = spec.projection_shape(module)
            if a.shape[1] != in_features or b.shape[0] != out_features:
                raise AdapterFormatError(
                    WEIGHTS_FILE,
                    f"{where}: shapes A {list(a.shape)}, B {list(b.shape)} do not fit the base model "
                    f"(expected A [{module_rank}, {in_features}], B [{out_features}, {module_rank}])",
                )
    num_layers = spec.num_layers if spec is not None else max((layer for layer, _ in pairs), default=-1) + 1
    try:
        # Without the base model, Qwen3's norms are taken to exist: a pattern selecting them is refused.
        qk_norm = spec is None or spec.architecture == "Qwen3ForCausalLM"
        _check_selection(rule, config, set(pairs), num_layers, qk_norm)
    except TargetError as e:
        raise AdapterFormatError(f"{CONFIG_FILE}.{e.key}", e.reason) from None
    modules = tuple(m for m in PROJECTIONS if any(mod == m for _, mod in pairs))
    for key, names in left_out.items():
        verb = "excludes" if key == "exclude_modules" else "does not select"
        raise AdapterFormatError(
            f"{CONFIG_FILE}.{key}",
            f"{verb} {describe(names)}, whose weights {WEIGHTS_FILE} holds: PEFT would leave them "
            "out and serve another adapter than these weights (save the adapter again, or fix the config)",
        )
    dtypes = {t.dtype for t in tensors}
    if check_values:
        _check_finite(weights_path, data_offset, tensors)
    return AdapterInfo(
        rank=max(module_ranks.values()),
        alpha=alpha,
        use_rslora=use_rslora,
        target_modules=modules,
        layers=tuple(sorted({layer for layer, _ in pairs})),
        dtype=dtypes.pop() if len(dtypes) == 1 else "mixed",
        size_bytes=size_bytes,
        tensors=tuple(tensors),
        module_scalings=tuple(module_scalings),
        default_rank=rank,
    )


# init_lora_weights values with which PEFT starts lora_B at zero: a module the config selects but the file
# holds no weights for then adds nothing, as when this server leaves it out. With any other (false, random
# or orthogonal) PEFT serves that module's random start.
_ZERO_B_INITS = ("gaussian",)  # PEFT compares "gaussian" in any case, "eva" exactly


def _other_module_names(num_layers: int, qk_norm: bool):
    """The names of a Llama, Mistral, Qwen2 or Qwen3 transformers model's modules besides the seven
    projections; `qk_norm`: Qwen3's per-head norms of the queries and keys too."""
    yield from ("model", "model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb", "lm_head")
    for i in range(num_layers):
        layer = f"model.layers.{i}"
        yield from (layer, f"{layer}.self_attn", f"{layer}.mlp", f"{layer}.mlp.act_fn")
        yield from (f"{layer}.input_layernorm", f"{layer}.post_attention_layernorm")
        if qk_norm:
            yield from (f"{layer}.self_attn.q_norm", f"{layer}.self_attn.k_norm")


def _check_selection(
    rule: TargetRule, config: dict, held: set[tuple[int, str]], num_layers: int, qk_norm: bool
) -> None:
    """What the config selects against what the file holds, both by PEFT's rule: a selected module other
    than the projections (a regular expression such as `.*` or `.*|lm_head`: PEFT wraps it or fails) is
    refused naming target_modules; a selected projection the file holds no weights for is refused unless
    PEFT starts its lora_B at zero (it would serve that module's random start)."""
    targets = config.get("target_modules")
    if not (isinstance(targets, str) and targets.lower() == ALL_LINEAR):  # the projections, never lm_head
        for name in _other_module_names(num_layers, qk_norm):
            if rule.leaves_out(name) is None:
                raise AdapterFormatError(
                    f"{CONFIG_FILE}.target_modules",
                    f"selects {describe(name)}, a module LoRA does not apply to here (PEFT would wrap it or "
                    f"refuse it); supported: {list(PROJECTIONS)}",
                )
    init = config.get("init_lora_weights", True)
    if init is True or init == "eva" or (isinstance(init, str) and init.lower() in _ZERO_B_INITS):
        return
    for layer in range(num_layers):
        for module in PROJECTIONS:
            name = f"model.layers.{layer}.{_MODULE_PARENT[module]}.{module}"
            if (layer, module) not in held and rule.leaves_out(name) is None:
                raise AdapterFormatError(
                    WEIGHTS_FILE,
                    f"layer {layer} {module}: selected by {CONFIG_FILE} but holds no lora_A / lora_B; with "
                    f"init_lora_weights {describe(init)} PEFT would serve that module's random start, not "
                    "these weights (save the adapter again, or fix the config)",
                )


def served_rank(directory: Path) -> int:
    """The rank an adapter directory needs in a slot: its config checked (AdapterFormatError naming the
    field), then its largest module rank from the weights' header (`max_module_rank`)."""
    parse_adapter_config((Path(directory) / CONFIG_FILE).read_bytes())
    return max_module_rank(Path(directory) / WEIGHTS_FILE)


def max_module_rank(weights_path: Path) -> int:
    """The largest rank among the adapter's modules (what its slot must hold), from the safetensors header
    alone: `r` in the config is only the default a rank_pattern may override for every module."""
    header, data_offset = read_safetensors_header(weights_path)
    tensors = _tensor_infos(header, weights_path.stat().st_size - data_offset)
    return max((t.shape[0] for t in tensors if t.which == "A"), default=0)


def peft_module_name(tensor_name: str) -> str:
    """The name PEFT's patterns are matched against: the module's name in the transformers model
    (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` -> `model.layers.0.self_attn.q_proj`)."""
    return tensor_name.removeprefix("base_model.model.").split(".lora_", 1)[0]
