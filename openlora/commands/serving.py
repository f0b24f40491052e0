"""The serving subcommands: `worker`, `generate`, `demo-model` and `up`.

`add_commands(subparsers)` registers them on the `openlora` parser. Settings come from flags, then
`OPENLORA_*` environment variables, then (for `generate`) the context file `openlora up` writes; they are
read here, once, into frozen configs.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import sys
from pathlib import Path

from data_plane.server.config import (
    DTYPES,
    ENGINE_CORES,
    MAX_ADAPTER_SLOTS,
    MAX_AUTH_CACHE_TTL_S,
    MAX_LORA_RANK,
    MAX_REQUEST_ID_RESERVATION_S,
    MAX_STREAM_INTERVAL,
    MIN_REQUEST_ID_RESERVATION_S,
    QUANTIZE_FORMATS,
)
from openlora.config import (
    client_settings,
    context_path,
    context_problem,
    context_source,
    first_given,
    read_context,
)
from openlora.grpc_limits import DEFAULT_MAX_CONNECTIONS
from openlora.kernel_choice import kernel_choice as kernels_setting
from openlora.kernel_choice import triton_device_problem
from openlora.log_level import LOG_LEVEL_HELP, configure_logging, resolve_log_level
from openlora.mix_rules import MIN_DENSITY, parse_mix
from openlora.setting_rules import ascii_lower, choice, number, whole_number
from openlora.setting_rules import yes_no as read_yes_no
from openlora.text_rules import TENANT_NAME, TENANT_NAME_RULE

ENV_PREFIX = "OPENLORA_"


def write_context(path: Path, context: dict) -> None:
    """Writes the context file readable by the owner only (it holds an api key)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(context, f, indent=2)
    os.replace(tmp, path)


def _env(name: str, default=None):
    """OPENLORA_<name>, else `default`: an empty variable is an unset one."""
    return os.environ.get(ENV_PREFIX + name) or default


class _EnvValue(str):
    """A flag's default as OPENLORA_<name> sets it, remembering the variable: argparse converts a string
    default with the flag's type when that command is parsed, and the type names the variable when the
    value is malformed (a flag given on the command line is named by argparse)."""

    variable: str


def _env_number(name: str, default):
    """The default of a number flag: OPENLORA_<name> as an `_EnvValue` (an empty variable is unset), else
    `default`. A malformed value is refused when that command is parsed (exit 2), never by the parser
    of another command."""
    value = _env(name)
    if value in (None, ""):
        return default
    text = _EnvValue(value)
    text.variable = ENV_PREFIX + name
    return text


def _number_type(read, **bounds):
    """The argparse `type` of a number flag: `read` (`setting_rules.whole_number` or `number`) within
    `bounds`, its refusal naming the variable the value came from, if any (argparse names the flag)."""

    def parse(text: str):
        try:
            return read(text, **bounds)
        except ValueError as error:
            source = f"{text.variable} " if isinstance(text, _EnvValue) else ""
            raise argparse.ArgumentTypeError(f"{source}{error}") from None

    parse.__name__ = read.__name__
    return parse


_count = _number_type(whole_number, minimum=1)
_bytes = _number_type(whole_number, minimum=0)
_port = _number_type(whole_number, minimum=0, maximum=65535)
_seconds = _number_type(number, minimum=0.0)


def _seed_value(text: str) -> int:
    """A seed as the wire's uint64 holds it: a whole number in [-2^63, 2^64), a negative one as its two's
    complement (-1 is 2^64 - 1), as the HTTP API takes OpenAI's int64 seed."""
    return whole_number(text, minimum=-(1 << 63), maximum=(1 << 64) - 1) % (1 << 64)


def _seed(text: str) -> int:
    try:
        return _seed_value(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


# ---------------------------------------------------------------------------------------------- worker


def _add_worker(subparsers) -> None:
    p = subparsers.add_parser("worker", help="run a data-plane worker (InferenceService) on one device")
    p.add_argument("--model", default=_env("MODEL"), help="base model directory (OPENLORA_MODEL)")
    p.add_argument(
        "--model-name",
        default=_env("MODEL_NAME", ""),
        help="base model name (OPENLORA_MODEL_NAME; default: the model directory's name)",
    )
    p.add_argument(
        "--listen",
        default=_env("LISTEN", "127.0.0.1:50052"),
        help="host:port of the gRPC InferenceService (OPENLORA_LISTEN; default 127.0.0.1:50052)",
    )
    p.add_argument(
        "--advertise",
        default=_env("ADVERTISE"),
        help="host:port the control plane records for this worker (OPENLORA_ADVERTISE; default: --listen's)",
    )
    p.add_argument(
        "--control-plane",
        default=_env("CONTROL_PLANE") or _env("ADMIN_TARGET"),
        help="control plane host:port (OPENLORA_CONTROL_PLANE)",
    )
    p.add_argument(
        "--worker-token",
        default=_env("WORKER_TOKEN"),
        help="the control plane's worker token, kept in its state dir's worker_token file, or under `up` in "
        "STATE_DIR/up-secrets.json as worker_token (OPENLORA_WORKER_TOKEN)",
    )
    p.add_argument(
        "--worker-id",
        default=_env("WORKER_ID", ""),
        help="id to register under; default: kept in the state dir (OPENLORA_WORKER_ID)",
    )
    p.add_argument(
        "--state-dir",
        default=_env("STATE_DIR", ".state/worker"),
        help="artifacts, usage spool and id (OPENLORA_STATE_DIR; default .state/worker)",
    )
    p.add_argument(
        "--redis-url",
        default=_env("REDIS_URL"),
        help="Redis of the prewarm hints; none: no hints (OPENLORA_REDIS_URL)",
    )
    p.add_argument(
        "--device", default=_env("DEVICE", "cpu"), help="cpu, cuda or cuda:N (OPENLORA_DEVICE; default cpu)"
    )
    p.add_argument(
        "--dtype",
        default=_env("DTYPE", "auto"),
        help="auto (float32 on CPU; on CUDA float16 for a float16 checkpoint, else bfloat16), float32, bfloat16 or float16 (OPENLORA_DTYPE)",
    )
    p.add_argument(
        "--max-lora-rank",
        type=_number_type(whole_number, minimum=1, maximum=MAX_LORA_RANK),
        default=_env_number("MAX_LORA_RANK", 64),
        help="largest adapter rank a slot holds (OPENLORA_MAX_LORA_RANK; default 64)",
    )
    p.add_argument(
        "--num-adapter-slots",
        type=_number_type(whole_number, minimum=1, maximum=MAX_ADAPTER_SLOTS),
        default=_env_number("NUM_ADAPTER_SLOTS", 32),
        help="adapters on the device at once (OPENLORA_NUM_ADAPTER_SLOTS; default 32)",
    )
    p.add_argument(
        "--kv-cache-bytes",
        type=_number_type(whole_number, minimum=1),
        default=_env_number("KV_CACHE_BYTES", None),
        help="the paged KV cache's size in bytes (OPENLORA_KV_CACHE_BYTES; default 256 MiB)",
    )
    p.add_argument(
        "--num-kv-blocks",
        type=_count,
        default=_env_number("NUM_KV_BLOCKS", None),
        help="KV cache size in blocks, instead of bytes (OPENLORA_NUM_KV_BLOCKS)",
    )
    p.add_argument(
        "--max-num-seqs",
        type=_count,
        default=_env_number("MAX_NUM_SEQS", 64),
        help="sequences a step runs at most (OPENLORA_MAX_NUM_SEQS; default 64)",
    )
    p.add_argument(
        "--max-model-len",
        type=_number_type(whole_number, minimum=2),
        default=_env_number("MAX_MODEL_LEN", None),
        help="prompt + output tokens per request; default: the model's (OPENLORA_MAX_MODEL_LEN)",
    )
    _add_quantize_flags(p)
    p.add_argument(
        "--host-cache-bytes",
        type=_bytes,
        default=_env_number("HOST_CACHE_BYTES", None),
        help="adapter host-memory budget (OPENLORA_HOST_CACHE_BYTES; default RAM/8, at most 8 GiB)",
    )
    p.add_argument(
        "--disk-cache-bytes",
        type=_bytes,
        default=_env_number("DISK_CACHE_BYTES", None),
        help="local artifact disk budget (OPENLORA_DISK_CACHE_BYTES; default free disk/4, at most 20 GiB)",
    )
    p.add_argument(
        "--max-waiting",
        type=_count,
        default=_env_number("MAX_WAITING", 256),
        help="requests queued past the running ones before RESOURCE_EXHAUSTED (OPENLORA_MAX_WAITING; default 256)",
    )
    p.add_argument(
        "--max-connections",
        type=_count,
        default=_env_number("MAX_CONNECTIONS", DEFAULT_MAX_CONNECTIONS),
        help=f"gRPC connections held at once (OPENLORA_MAX_CONNECTIONS; default {DEFAULT_MAX_CONNECTIONS})",
    )
    p.add_argument(
        "--max-pending-merges-per-tenant",
        type=_count,
        default=_env_number("MAX_PENDING_MERGES_PER_TENANT", 4),
        help="merge builds one tenant may have pending before a new one is refused "
        "(OPENLORA_MAX_PENDING_MERGES_PER_TENANT; default 4)",
    )
    p.add_argument(
        "--max-streams-per-tenant",
        type=_count,
        default=_env_number("MAX_STREAMS_PER_TENANT", None),
        help="streams one tenant may have on this worker at once, past it RESOURCE_EXHAUSTED for that "
        "tenant (OPENLORA_MAX_STREAMS_PER_TENANT; default half of --max-num-seqs + --max-waiting)",
    )
    p.add_argument(
        "--stream-interval",
        type=_number_type(whole_number, minimum=1, maximum=MAX_STREAM_INTERVAL),
        default=_env_number("STREAM_INTERVAL", 1),
        help="tokens a streamed message carries at least past the first (the last may carry fewer): "
        "more sends text in coarser pieces for less serving work per token; the first token, the end "
        "and errors are never held back (OPENLORA_STREAM_INTERVAL; default 1)",
    )
    p.add_argument(
        "--engine-core",
        default=_env("ENGINE_CORE", "process"),
        help="where the engine loop runs: process (a child process of its own, so the serving path and "
        "the engine never wait on one interpreter lock) or thread (in the worker's process) "
        "(OPENLORA_ENGINE_CORE; default process)",
    )
    p.add_argument(
        "--max-tokens-limit",
        type=_count,
        default=_env_number("MAX_TOKENS_LIMIT", 4096),
        help="largest max_tokens a request may ask (OPENLORA_MAX_TOKENS_LIMIT; default 4096)",
    )
    p.add_argument(
        "--drain-grace-s",
        type=_seconds,
        default=_env_number("DRAIN_GRACE_S", 30.0),
        help="seconds running streams get to finish on SIGTERM (OPENLORA_DRAIN_GRACE_S; default 30)",
    )
    p.add_argument(
        "--metrics-port",
        type=_port,
        default=_env_number("METRICS_PORT", 0),
        help="Prometheus /metrics port, 0 = off (OPENLORA_METRICS_PORT)",
    )
    p.add_argument(
        "--http-listen",
        default=_env("HTTP_LISTEN", ""),
        help="HOST:PORT of the OpenAI-compatible HTTP API, empty = off (OPENLORA_HTTP_LISTEN)",
    )
    p.add_argument(
        "--http-metrics",
        action="store_true",
        default=_env("HTTP_METRICS", False),  # read by `yes_no`: a bad value is refused there
        help="also serve GET /metrics on the HTTP API's listener; it needs no key and names the adapters "
        "in use, private ones included, so only on a listener the public cannot reach (OPENLORA_HTTP_METRICS)",
    )
    p.add_argument(
        "--auth-cache-ttl-s",
        type=_number_type(number, minimum=0.0, maximum=MAX_AUTH_CACHE_TTL_S),
        default=_env_number("AUTH_CACHE_TTL_S", 10.0),
        help="seconds an Authorize answer is reused, at most 10 (OPENLORA_AUTH_CACHE_TTL_S; default 10)",
    )
    p.add_argument(
        "--request-id-reservation-s",
        type=_number_type(number, minimum=MIN_REQUEST_ID_RESERVATION_S, maximum=MAX_REQUEST_ID_RESERVATION_S),
        default=_env_number("REQUEST_ID_RESERVATION_S", 30.0),
        help="seconds a stream's client request id stays reserved unless renewed, what a retry under it "
        "waits after its worker died or stalled, in [1, 3600] (OPENLORA_REQUEST_ID_RESERVATION_S; default 30)",
    )
    p.add_argument("--log-level", help=LOG_LEVEL_HELP)
    p.set_defaults(func=_run_worker)


def _add_quantize_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quantize",
        default=_env("QUANTIZE", "none"),
        help="hold the base model's decoder linears as none, int8 or int4 (OPENLORA_QUANTIZE; default none)",
    )
    p.add_argument(
        "--quantize-lm-head",
        action="store_true",
        default=_env("QUANTIZE_LM_HEAD", False),  # read by `quantize_lm_head`: a bad value is refused there
        help="quantize lm_head too (OPENLORA_QUANTIZE_LM_HEAD: 1/true/yes/on or 0/false/no/off)",
    )


def yes_no(value: bool | str, flag: str) -> bool:
    """A store_true flag whose default is its environment variable's text: True when the flag was given,
    else the variable read as a yes/no word (`setting_rules.yes_no`); any other text is refused
    (ValueError naming the variable and its flag) rather than read as yes or no."""
    if isinstance(value, bool):
        return value
    try:
        return read_yes_no(value)
    except ValueError as error:
        raise ValueError(f"{_variable(flag)} (for {flag}) {error}") from None


def _variable(flag: str) -> str:
    return ENV_PREFIX + flag.removeprefix("--").replace("-", "_").upper()


def _spelled(text: str, choices: tuple[str, ...]) -> str:
    """`text` as `choices` spell it when it is one of them in another ASCII case, else as given (the
    check that names the flag then refuses it)."""
    try:
        return choice(text, choices)
    except ValueError:
        return text


def quantize_lm_head(args: argparse.Namespace) -> bool:
    """--quantize-lm-head, else OPENLORA_QUANTIZE_LM_HEAD (`yes_no`)."""
    return yes_no(args.quantize_lm_head, "--quantize-lm-head")


def worker_config_from_args(args: argparse.Namespace):
    from data_plane.server.config import EngineSettings, WorkerConfig

    if not args.model:
        raise ValueError("--model (or OPENLORA_MODEL) is required")
    # Said here by flag and variable: the config's own checks name its fields (control_plane_target), which
    # no flag is called, and a field named by _as_flag repeated its flag and variable twice.
    if not args.control_plane:
        raise ValueError(
            "--control-plane (or OPENLORA_CONTROL_PLANE, else OPENLORA_ADMIN_TARGET) is required"
        )
    if not args.worker_token:
        raise ValueError(
            "--worker-token (or OPENLORA_WORKER_TOKEN) is required: the control plane's, kept in its state "
            "directory's worker_token file (under `up`: STATE_DIR/up-secrets.json, worker_token)"
        )
    _spell_words(args)
    if args.engine_core not in ENGINE_CORES:
        raise ValueError(
            f"--engine-core (OPENLORA_ENGINE_CORE) must be one of {', '.join(ENGINE_CORES)}, "
            f"got {args.engine_core!r}"
        )
    if (problem := device_problem(args.device) or cuda_problem(args.device)) is not None:
        raise ValueError(f"device {problem}")  # exit 2: restarting a worker would not help
    from openlora_kernels import kernel_choice, triton_runs_on

    # A bad OPENLORA_KERNELS stops the worker here, not every request it would serve.
    if kernel_choice() == "triton" and not triton_runs_on(args.device):
        raise ValueError(triton_device_problem(args.device))
    return WorkerConfig(
        model_dir=Path(args.model),
        model_name=args.model_name,
        control_plane_target=args.control_plane or "",
        worker_token=args.worker_token or "",
        state_dir=Path(args.state_dir),
        listen=args.listen,
        advertise_address=args.advertise,
        worker_id=args.worker_id,
        engine=EngineSettings(
            dtype=args.dtype,
            device=args.device,
            max_lora_rank=args.max_lora_rank,
            num_adapter_slots=args.num_adapter_slots,
            kv_cache_bytes=args.kv_cache_bytes,
            num_kv_blocks=args.num_kv_blocks,
            max_num_seqs=args.max_num_seqs,
            max_model_len=args.max_model_len,
            host_cache_bytes=args.host_cache_bytes,
            quantize=args.quantize,
            quantize_lm_head=quantize_lm_head(args),
        ),
        max_waiting=args.max_waiting,
        max_connections=args.max_connections,
        http_metrics=yes_no(args.http_metrics, "--http-metrics"),
        max_streams_per_tenant=args.max_streams_per_tenant,
        max_pending_merges_per_tenant=args.max_pending_merges_per_tenant,
        max_tokens_limit=args.max_tokens_limit,
        stream_interval=args.stream_interval,
        engine_core=args.engine_core,
        redis_url=args.redis_url,
        drain_grace_s=args.drain_grace_s,
        metrics_port=args.metrics_port,
        http_listen=args.http_listen,
        auth_cache_ttl_s=args.auth_cache_ttl_s,
        request_id_reservation_s=args.request_id_reservation_s,
        disk_cache_bytes=args.disk_cache_bytes,
    )


def _spell_words(args: argparse.Namespace) -> None:
    """--device, --dtype and --quantize in the case their checks and the engine take (`setting_rules`:
    a named choice is matched in any ASCII case)."""
    spelled = ascii_lower(args.device)
    if spelled is not None and _DEVICE.fullmatch(spelled):  # a refusal quotes the text as it was typed
        args.device = spelled
    args.quantize = _spelled(args.quantize, QUANTIZE_FORMATS)
    if hasattr(args, "engine_core"):
        args.engine_core = _spelled(args.engine_core, ENGINE_CORES)
    if hasattr(args, "dtype"):
        args.dtype = _spelled(args.dtype, DTYPES)


_DEVICE = re.compile(r"cpu|cuda(?::[0-9]{1,3})?")


def device_problem(device: str) -> str | None:
    """Why `device` is not a device the worker can take, read off the name alone (cheap: `up` checks it
    before it starts anything), or None."""
    if not _DEVICE.fullmatch(device):
        return f"must be cpu, cuda or cuda:N, got {device!r}"
    return None


def cuda_problem(device: str) -> str | None:
    """Why this machine cannot run a CUDA `device` (torch built without CUDA, no GPU, no such index), or
    None. Imports torch: the worker checks it before loading anything."""
    if not device.startswith("cuda"):
        return None
    import torch

    if not torch.cuda.is_available():
        build = "a CPU-only build of torch" if torch.version.cuda is None else "no CUDA device visible"
        return f"is {device!r}, but torch {torch.__version__} finds no GPU ({build}): use cpu"
    index, count = int(device.partition(":")[2] or 0), torch.cuda.device_count()
    if index >= count:
        return f"is {device!r}, but this machine has {count} CUDA device(s): cuda:0..cuda:{count - 1}"
    return None


def _as_flag(message: str, args: argparse.Namespace) -> str:
    """A config check's message that starts with a setting's field name ("num_adapter_slots must ..."),
    reworded to name the worker's flag and variable the operator set it by."""
    field, sep, rest = message.partition(" ")
    if not sep or not hasattr(args, field) or not field.replace("_", "").isalpha():
        return message
    return f"--{field.replace('_', '-')} ({ENV_PREFIX}{field.upper()}) {rest}"


def _run_worker(args: argparse.Namespace) -> int:
    try:
        configure_logging(resolve_log_level(args.log_level, os.environ))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        config = worker_config_from_args(args)
    except ValueError as error:
        print(f"error: {_as_flag(str(error), args)}", file=sys.stderr)
        return 2
    import grpc

    from data_plane.model.quant import QuantizationError
    from data_plane.server.control_plane_client import ControlPlaneError
    from data_plane.server.main import StateDirInUse, StateDirUnwritable, run_worker
    from openlora.artifact import SharedArtifactsDir
    from openlora.listen import ListenError

    try:
        return run_worker(config)
    except (StateDirInUse, StateDirUnwritable) as error:
        # A live worker's (or one still draining), or a full disk: a supervisor tries again later.
        print(f"error: {error}", file=sys.stderr)
        return 1
    except SharedArtifactsDir as error:  # the control plane's state dir: starting again won't help
        print(f"error: {error}", file=sys.stderr)
        return 2
    except QuantizationError as error:  # found while loading (the device cannot run the format)
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ControlPlaneError as error:  # the control plane refused to register it: starting again won't help
        print(f"error: the control plane refused this worker: {error.message}", file=sys.stderr)
        if error.code == grpc.StatusCode.ALREADY_EXISTS:
            return 1  # its worker id is a live worker's: a supervisor tries again later
        if error.code == grpc.StatusCode.UNAUTHENTICATED:
            print(
                "hint: --worker-token (OPENLORA_WORKER_TOKEN) must be the control plane's, kept in its "
                "state directory's worker_token file (under `up`: STATE_DIR/up-secrets.json, worker_token)",
                file=sys.stderr,
            )
        return 2
    except ListenError as error:  # one line, not a traceback; a supervisor tries again later
        print(f"error: {error}", file=sys.stderr)
        return 1
    except ValueError as error:  # a setting the engine's checks refused as it was built: named by its flag
        print(f"error: {_as_flag(str(error), args)}", file=sys.stderr)
        return 2


# -------------------------------------------------------------------------------------------- generate


def _parse_mix(text: str) -> list[tuple[str, float]]:
    """`--mix` of `generate` (`a=0.5,b=0.5`; `=0.5` is the base model, an ensemble member), as `mixes
    create` reads it."""
    try:
        return parse_mix(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_generate(subparsers) -> None:
    p = subparsers.add_parser("generate", help="stream a completion to stdout")
    p.add_argument("prompt", help='prompt text ("-" reads stdin, less one trailing newline)')
    p.add_argument("--adapter", default=None, help="adapter or saved mix name (default: the base model)")
    p.add_argument(
        "--mix",
        type=_parse_mix,
        default=None,
        help="runtime mix, e.g. a=0.5,b=0.5 (=W: the base model, an ensemble member)",
    )
    p.add_argument(
        "--mix-method",
        default=None,
        choices=["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "ensemble"],
        help="how --mix combines its adapters (default linear)",
    )
    p.add_argument(
        "--density",
        type=_number_type(number, minimum=MIN_DENSITY, maximum=1.0),
        default=None,
        help="fraction kept by ties, dare_*, magnitude_prune",
    )
    p.add_argument(
        "--majority-sign-method",
        default=None,
        choices=["total", "frequency"],
        help="how ties and dare_ties elect each parameter's sign (default total)",
    )
    p.add_argument(
        "--combine",
        default=None,
        choices=["probs", "logprobs"],
        help="how an ensemble combines its members' next-token distributions (default probs)",
    )
    p.add_argument(
        "--max-tokens",
        type=_count,
        default=None,
        help="tokens to generate at most (default: the worker's, 128)",
    )
    p.add_argument(
        "--temperature",
        type=_number_type(number, minimum=0.0),
        default=None,
        help=">= 0; 0 decodes greedily (default 0)",
    )
    p.add_argument(
        "--top-p",
        type=_number_type(number, minimum=0.0, maximum=1.0, minimum_allowed=False),
        default=None,
        help="nucleus sampling mass in (0, 1] (default 1)",
    )
    p.add_argument(
        "--top-k",
        type=_number_type(whole_number, minimum=0),
        default=0,
        help="keep the k most likely tokens (default 0: all)",
    )
    p.add_argument(
        "--seed",
        type=_seed,
        default=None,
        help="sampling seed in [-2^63, 2^64), a negative one as its two's complement (default: a fresh one "
        "per request)",
    )
    p.add_argument(
        "--stop", action="append", default=[], help="stop string, excluded from the text (repeatable)"
    )
    p.add_argument(
        "--request-id",
        default=None,
        help="idempotency key: a second call with a used or running id is refused ALREADY_EXISTS (default: the worker makes one)",
    )
    p.add_argument("--target", default=None, help="worker host:port (OPENLORA_TARGET, else the context file)")
    p.add_argument("--api-key", default=None, help="(OPENLORA_API_KEY, else the context file)")
    p.add_argument("--verbose", "-v", action="store_true", help="print usage and timing to stderr")
    p.set_defaults(func=_run_generate)


def _wire_as_flag(message: str, args: argparse.Namespace) -> str:
    """A request field's refusal ("sampling.top_k: 99999999999 does not fit the field ..."), reworded to
    name the flag that set it."""
    path, sep, rest = message.partition(": ")
    field = path.rpartition(".")[2]
    if not sep or not hasattr(args, field) or not field.replace("_", "").isalpha():
        return message
    return f"--{field.replace('_', '-')}: {rest}"


def _run_generate(args: argparse.Namespace) -> int:
    import grpc

    from openlora.client import Client
    from openlora.errors import OpenLoRAError
    from openlora.v1 import inference_pb2

    context = read_context(os.environ)
    try:
        target, api_key = client_settings(
            first_given(
                (args.target, "--target"),
                (_env("TARGET"), "OPENLORA_TARGET"),
                (context.get("target"), context_source(os.environ, "target")),
            ),
            first_given(
                (args.api_key, "--api-key"),
                (_env("API_KEY"), "OPENLORA_API_KEY"),
                (context.get("api_key"), context_source(os.environ, "api_key")),
            ),
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not target or not api_key:
        print(
            "error: no worker target or api key: pass --target/--api-key, set OPENLORA_TARGET/"
            "OPENLORA_API_KEY, or run `openlora up` first" + context_problem(os.environ),
            file=sys.stderr,
        )
        return 2
    if args.mix_method is not None and args.mix is None:
        print("error: --mix-method applies only to a --mix", file=sys.stderr)
        return 2
    prompt = args.prompt
    if prompt == "-":  # `echo "..." |` adds a newline the prompt did not have, and it changes the answer
        try:  # UTF-8 whatever the locale: the wire carries nothing else (newlines read as text mode reads them)
            prompt = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8").read()
        except UnicodeDecodeError:
            print("error: prompt: stdin is not UTF-8 text", file=sys.stderr)
            return 2
        prompt = prompt[:-2] if prompt.endswith("\r\n") else prompt.removesuffix("\n")
    last = None
    with Client(target, api_key) as client:
        try:
            for response in client.generate_stream(
                prompt,
                adapter=args.adapter,
                mix=args.mix,
                mix_method=args.mix_method or "linear",
                density=args.density,
                majority_sign_method=args.majority_sign_method,
                combine=args.combine,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=args.top_k,
                seed=args.seed,
                stop=args.stop,
                request_id=args.request_id,
            ):
                if response.text:
                    sys.stdout.write(response.text)
                    sys.stdout.flush()
                last = response
        except OpenLoRAError as error:
            if last is not None:  # text was streamed: end its line first
                sys.stdout.write("\n")
            print(f"error: {error.code.name}: {error.details}", file=sys.stderr)
            from openlora.cli import address_hint

            hint = address_hint(error.code, error.details)
            if hint is not None:
                print(hint, file=sys.stderr)
            if error.code == grpc.StatusCode.UNAUTHENTICATED and api_key == context.get("api_key"):
                from openlora.cli import context_key_hint

                print(context_key_hint(os.environ), file=sys.stderr)
            return 1
        except ValueError as error:  # a flag's value the request's field cannot hold (found building it)
            print(f"error: {_wire_as_flag(str(error), args)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130
    sys.stdout.write("\n")
    if args.verbose and last is not None:
        t, u = last.timing, last.usage
        print(
            f"request_id={last.request_id} prompt_tokens={u.prompt_tokens} completion_tokens={u.completion_tokens} "
            f"ttft_ms={t.ttft_ms:.1f} total_ms={t.total_ms:.1f} "
            f"cache_tier={inference_pb2.CacheTier.Name(t.cache_tier).removeprefix('CACHE_TIER_').lower()}",
            file=sys.stderr,
        )
    return 0


# ------------------------------------------------------------------------------------------ demo-model


def _add_demo_model(subparsers) -> None:
    p = subparsers.add_parser("demo-model", help="write a small demo Llama checkpoint and PEFT adapters")
    p.add_argument("out_dir", type=Path, help="directory to write the model and its adapters into")
    p.set_defaults(func=_run_demo_model)


def _run_demo_model(args: argparse.Namespace) -> int:
    from data_plane.demo import write_demo_model

    configure_logging()
    try:
        write_demo_model(args.out_dir)
    except OSError as e:  # not a directory, not writable, disk full: one line, not a traceback
        print(f"error: {e.filename or args.out_dir}: {e.strerror or e}", file=sys.stderr)
        return 2
    adapters = sorted(p.name for p in (args.out_dir / "adapters").iterdir() if p.is_dir())
    print(f"demo model written to {args.out_dir} (adapters: {', '.join(adapters)})")
    return 0


# ------------------------------------------------------------------------------------------------- up


def _add_up(subparsers) -> None:
    p = subparsers.add_parser("up", help="run the whole system on this machine until Ctrl-C")
    p.add_argument(
        "--state-dir",
        default=_env("STATE_DIR", ".state"),
        help="databases, logs, secrets and the demo model (OPENLORA_STATE_DIR; default .state)",
    )
    p.add_argument(
        "--model",
        default=_env("MODEL"),
        help="base model directory (OPENLORA_MODEL); default: the demo model",
    )
    p.add_argument(
        "--database-url",
        default=_env("DATABASE_URL"),
        help="(OPENLORA_DATABASE_URL) default: embedded PostgreSQL",
    )
    p.add_argument(
        "--redis-url", default=_env("REDIS_URL"), help="(OPENLORA_REDIS_URL) default: embedded Redis"
    )
    p.add_argument(
        "--host",
        default=_env("HOST", "127.0.0.1"),
        help="address every server listens on (OPENLORA_HOST; default 127.0.0.1)",
    )
    p.add_argument(
        "--port",
        type=_port,
        default=_env_number("PORT", 50052),
        help="inference port (OPENLORA_PORT; default 50052; 0: any free port)",
    )
    p.add_argument(
        "--admin-port",
        type=_port,
        default=_env_number("ADMIN_PORT", 50051),
        help="control plane port (OPENLORA_ADMIN_PORT; default 50051; 0: any free port)",
    )
    p.add_argument(
        "--http-port",
        type=_port,
        default=_env_number("HTTP_PORT", None),
        help="OpenAI-compatible HTTP API port (OPENLORA_HTTP_PORT; 0: any free port; default 8000, any free "
        "one with --port 0)",
    )
    p.add_argument(
        "--metrics-port",
        type=_port,
        default=_env_number("METRICS_PORT", 0),
        help="the worker's /metrics port (OPENLORA_METRICS_PORT; default 0: off)",
    )
    p.add_argument(
        "--admin-metrics-port",
        type=_port,
        default=_env_number("ADMIN_METRICS_PORT", 0),
        help="the control plane's /metrics port (OPENLORA_ADMIN_METRICS_PORT; default 0: off)",
    )
    p.add_argument(
        "--device",
        default=_env("DEVICE", "cpu"),
        help="the worker's device: cpu, cuda or cuda:N (OPENLORA_DEVICE; default cpu)",
    )
    p.add_argument(
        "--tenant", default=_env("TENANT", "demo"), help="the demo tenant (OPENLORA_TENANT; default demo)"
    )
    p.add_argument("--context", default=None, help="context file; default OPENLORA_CONTEXT or XDG path")
    p.add_argument(
        "--drain-grace-s",
        type=_seconds,
        default=_env_number("DRAIN_GRACE_S", 30.0),
        help="seconds running streams get to finish on Ctrl-C or SIGTERM (OPENLORA_DRAIN_GRACE_S; default 30)",
    )
    p.add_argument(
        "--worker-arg",
        action="append",
        default=[],
        help="extra flag for the worker (repeatable; the worker's OPENLORA_* variables reach it too)",
    )
    _add_quantize_flags(p)
    p.add_argument("--log-level", help=f"{LOG_LEVEL_HELP}; the control plane's and the worker's too")
    from control_plane.prediction.settings import add_predictor_flags

    add_predictor_flags(p)  # handed on to the control plane
    p.set_defaults(func=_run_up)


def _run_up(args: argparse.Namespace) -> int:
    from openlora.commands.up import run_up

    try:
        config = up_config_from_args(args, os.environ)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_up(config)


def up_config_from_args(args: argparse.Namespace, environ):
    """`up`'s flags (and the predictor's OPENLORA_* variables) as an UpConfig; ValueError names a bad flag.
    Checked before anything starts, so a bad value never reaches a child that `up` would restart."""
    from control_plane.prediction.settings import (
        explicit_flags,
        resolve_interval_s,
        resolve_predictor_config,
    )
    from data_plane.server.config import quantize_problem
    from openlora.commands.up import UpConfig

    _spell_words(args)
    if (problem := quantize_problem(args.quantize, quantize_lm_head(args))) is not None:
        raise ValueError(problem)
    # CUDA too (imports torch only for a cuda device): a GPU this machine lacks stops `up` here, not after
    # the databases, the control plane and the demo model's training, as the worker's refusal did.
    if (problem := device_problem(args.device) or cuda_problem(args.device)) is not None:
        raise ValueError(f"--device (OPENLORA_DEVICE) {problem}")
    if not TENANT_NAME.fullmatch(args.tenant):
        raise ValueError(f"--tenant (OPENLORA_TENANT) must be {TENANT_NAME_RULE}, got {args.tenant!r}")
    # The worker child refuses these too, but only once the databases are up: checked here without torch
    # (Triton's interpreter as the worker would find it, by the variable it reads).
    interpreting = environ.get("TRITON_INTERPRET", "0") == "1"
    if kernels_setting(environ) == "triton" and not args.device.startswith("cuda") and not interpreting:
        raise ValueError(triton_device_problem(args.device))
    for flag in ("port", "admin_port", "http_port", "metrics_port", "admin_metrics_port"):
        port = getattr(args, flag)
        if port is not None and not 0 <= port <= 65535:
            raise ValueError(f"--{flag.replace('_', '-')} must be 0..65535, got {port}")
    if not 0 <= args.drain_grace_s < math.inf:  # the worker refuses it too, once the databases are up
        raise ValueError(
            f"--drain-grace-s (OPENLORA_DRAIN_GRACE_S) must be a finite number >= 0, got {args.drain_grace_s}"
        )
    log_level = resolve_log_level(args.log_level, environ)
    # The control plane child reads the same environment; its flags carry what was given here.
    resolve_interval_s(vars(args), environ)
    resolve_predictor_config(vars(args), environ)
    return UpConfig(
        state_dir=Path(args.state_dir).resolve(),
        model_dir=Path(args.model).resolve() if args.model else None,
        database_url=args.database_url,
        redis_url=args.redis_url,
        host=args.host,
        port=args.port,
        admin_port=args.admin_port,
        http_port=args.http_port if args.http_port is not None else (8000 if args.port else 0),
        device=args.device,
        tenant=args.tenant,
        context_path=Path(args.context) if args.context else context_path(environ),
        drain_grace_s=args.drain_grace_s,
        worker_args=tuple(args.worker_arg),
        quantize=args.quantize,
        quantize_lm_head=quantize_lm_head(args),
        control_plane_args=tuple(explicit_flags(vars(args))),
        metrics_port=args.metrics_port,
        admin_metrics_port=args.admin_metrics_port,
        log_level=log_level,
    )


def add_commands(subparsers) -> None:
    """Registers `worker`, `generate`, `demo-model` and `up` on an argparse subparsers object."""
    _add_worker(subparsers)
    _add_generate(subparsers)
    _add_demo_model(subparsers)
    _add_up(subparsers)


def main(argv: list[str] | None = None) -> int:
    """Entry for `python -m openlora.commands.serving` (the same subcommands without the rest of the CLI)."""
    parser = argparse.ArgumentParser(prog="openlora")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
