"""The worker process's one frozen configuration, built once at the entry point."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from openlora.grpc_limits import DEFAULT_MAX_CONNECTIONS
from openlora.listen import address_problem

MAX_AUTH_CACHE_TTL_S = 10.0
# Bounds of request_id_reservation_s (--request-id-reservation-s).
MIN_REQUEST_ID_RESERVATION_S = 1.0
MAX_REQUEST_ID_RESERVATION_S = 3600.0
# The base-model weight formats of data_plane.model.quant (kept here so the config imports no torch).
QUANTIZE_FORMATS = ("none", "int8", "int4")
# The engine's dtypes (data_plane.engine.config), for the command line's checks without torch.
DTYPES = ("auto", "float32", "bfloat16", "float16")


MAX_ADAPTER_SLOTS = 65536
MAX_LORA_RANK = 4096
# Largest --stream-interval: past it a message would wait for more tokens than any request makes.
MAX_STREAM_INTERVAL = 4096
# Where the engine loop runs (--engine-core): its own process, or a thread of the worker's.
ENGINE_CORES = ("process", "thread")


def quantize_problem(quantize: str, quantize_lm_head: bool) -> str | None:
    """Why --quantize and --quantize-lm-head cannot be served together, naming each flag with the
    variable that may have set it (the operator may never have typed the flag), or None."""
    if quantize not in QUANTIZE_FORMATS:
        return (
            f"--quantize (OPENLORA_QUANTIZE) must be one of {', '.join(QUANTIZE_FORMATS)}, got {quantize!r}"
        )
    if quantize_lm_head and quantize == "none":
        return (
            "--quantize-lm-head (OPENLORA_QUANTIZE_LM_HEAD) needs --quantize (OPENLORA_QUANTIZE) int8 or int4"
        )
    return None


@dataclass(frozen=True)
class EngineSettings:
    """What the worker passes to the engine's own config; None leaves the engine default."""

    dtype: str = "auto"
    device: str = "cpu"
    max_lora_rank: int = 64
    num_adapter_slots: int = 32
    num_kv_blocks: int | None = None
    kv_cache_bytes: int | None = None
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    # Adapter host-memory tier budget; None: an eighth of RAM, at most 8 GiB.
    host_cache_bytes: int | None = None
    # How the decoder layers' linears are held ("none" | "int8" | "int4"), and lm_head with them.
    quantize: str = "none"
    quantize_lm_head: bool = False


@dataclass(frozen=True)
class WorkerConfig:
    model_dir: Path
    control_plane_target: str
    worker_token: str
    state_dir: Path
    listen: str = "127.0.0.1:50052"
    # host:port the control plane records for this worker; defaults to the bound listen address.
    advertise_address: str | None = None
    # Stable id kept across restarts; empty lets the control plane choose (then stored in state_dir).
    worker_id: str = ""
    # Base model name announced to the control plane; empty means the model directory's name.
    model_name: str = ""
    engine: EngineSettings = field(default_factory=EngineSettings)
    # Requests waiting for admission beyond which Generate answers RESOURCE_EXHAUSTED at once.
    max_waiting: int = 256
    # Connections the gRPC server holds at once (see openlora.grpc_limits).
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    # Merge builds (TIES/DARE/magnitude-prune mixes) one tenant may have pending when it asks for a new one;
    # past it RESOURCE_EXHAUSTED, so one tenant's distinct merges never hold every other tenant's back.
    max_pending_merges_per_tenant: int = 4
    # Streams one tenant may have on this worker at once (running or waiting); past it RESOURCE_EXHAUSTED
    # for that tenant only, so one tenant's flood never fills the queue every tenant shares. None: half
    # of what the worker holds (engine max_num_seqs + max_waiting).
    max_streams_per_tenant: int | None = None
    # Tokens a stream's message carries at least, past the first token (the last message may carry fewer):
    # 1 sends each step's token at once; more trades how smoothly text arrives for less serving work per
    # token (a message built and written per `stream_interval` tokens). The first token, the end and errors
    # are never held back.
    stream_interval: int = 1
    # Where the engine loop runs: "process", a child process of its own (the engine core: the serving
    # path's Python never waits on the engine's interpreter lock, nor the engine on the serving path's),
    # or "thread", a thread of the worker's process (one process; what in-process tests use to reach the
    # engine's internals).
    engine_core: str = "process"
    # Upper bound of sampling.max_tokens; the engine's context length bounds it further.
    max_tokens_limit: int = 4096
    default_max_tokens: int = 128
    redis_url: str | None = None
    drain_grace_s: float = 30.0
    # 0 disables the Prometheus endpoint.
    metrics_port: int = 0
    # HOST:PORT of the OpenAI-compatible HTTP API (/v1/...); empty disables it.
    http_listen: str = ""
    # Also serve GET /metrics on that listener. Off by default: it takes no key and names the adapters
    # running and waiting, private ones included (the metrics port is the place for Prometheus).
    http_metrics: bool = False
    auth_cache_ttl_s: float = MAX_AUTH_CACHE_TTL_S
    # Most cached authorisation answers (one per api key and adapter names); the oldest go first.
    auth_cache_max_entries: int = 10_000
    # How long a stream's request id stays reserved at the control plane unless renewed (a third of it
    # apart while the stream runs): what a retry waits after a worker died before delivering anything.
    request_id_reservation_s: float = 30.0
    usage_flush_interval_s: float = 1.0
    usage_fsync_interval_s: float = 0.2
    # Period of the running streams' usage checkpoints: a crash leaves at most about this much unbilled.
    usage_checkpoint_interval_s: float = 0.5
    usage_batch_size: int = 500
    max_adapter_bytes: int = 512 << 20
    # Budget of the local artifact directory; None: a quarter of the free disk, at most 20 GiB.
    disk_cache_bytes: int | None = None
    # Period of the residency heartbeat written to Redis (adapters held, load).
    residency_interval_s: float = 2.0

    @property
    def effective_default_max_tokens(self) -> int:
        """The max_tokens of a request that sets none: the default, within the worker's limit."""
        return min(self.default_max_tokens, self.max_tokens_limit)

    @property
    def resolved_max_streams_per_tenant(self) -> int:
        if self.max_streams_per_tenant is not None:
            return self.max_streams_per_tenant
        return max(1, (self.engine.max_num_seqs + self.max_waiting) // 2)

    def __post_init__(self) -> None:
        if not self.control_plane_target:
            raise ValueError(
                "control_plane_target is required (flag --control-plane or OPENLORA_CONTROL_PLANE)"
            )
        if not self.worker_token:
            raise ValueError("worker_token is required (flag --worker-token or OPENLORA_WORKER_TOKEN)")
        if not 0 <= self.auth_cache_ttl_s <= MAX_AUTH_CACHE_TTL_S:
            raise ValueError(
                f"auth_cache_ttl_s must be in [0, {MAX_AUTH_CACHE_TTL_S}], got {self.auth_cache_ttl_s}"
            )
        if self.auth_cache_max_entries < 1:
            raise ValueError(f"auth_cache_max_entries must be >= 1, got {self.auth_cache_max_entries}")
        if not MIN_REQUEST_ID_RESERVATION_S <= self.request_id_reservation_s <= MAX_REQUEST_ID_RESERVATION_S:
            raise ValueError(
                f"request_id_reservation_s must be in [{MIN_REQUEST_ID_RESERVATION_S:g}, "
                f"{MAX_REQUEST_ID_RESERVATION_S:g}], got {self.request_id_reservation_s}"
            )
        if self.max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {self.max_waiting}")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {self.max_connections}")
        if self.max_streams_per_tenant is not None and self.max_streams_per_tenant < 1:
            raise ValueError(f"max_streams_per_tenant must be >= 1, got {self.max_streams_per_tenant}")
        if self.max_pending_merges_per_tenant < 1:
            raise ValueError(
                f"max_pending_merges_per_tenant must be >= 1, got {self.max_pending_merges_per_tenant}"
            )
        # A limit below the default lowers the default with it (`effective_default_max_tokens`): a worker
        # given --max-tokens-limit 64 refused to start naming default_max_tokens, which no flag sets.
        if self.max_tokens_limit < 1:
            raise ValueError(f"max_tokens_limit must be >= 1, got {self.max_tokens_limit}")
        if self.engine_core not in ENGINE_CORES:
            raise ValueError(
                f"engine_core must be one of {', '.join(ENGINE_CORES)}, got {self.engine_core!r}"
            )
        if not 1 <= self.stream_interval <= MAX_STREAM_INTERVAL:
            raise ValueError(
                f"stream_interval must be in [1, {MAX_STREAM_INTERVAL}], got {self.stream_interval}"
            )
        if self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be >= 1, got {self.default_max_tokens}")
        if not 0 <= self.drain_grace_s < math.inf:  # NaN drained as 0 s: every stream cut at once
            raise ValueError(f"drain_grace_s must be a finite number >= 0, got {self.drain_grace_s}")
        if self.usage_flush_interval_s <= 0 or self.usage_fsync_interval_s <= 0:
            raise ValueError("usage intervals must be > 0")
        if not 0 < self.usage_checkpoint_interval_s <= 1.0:
            raise ValueError(
                f"usage_checkpoint_interval_s must be in (0, 1], got {self.usage_checkpoint_interval_s}"
            )
        # Upper bounds a pool could ever use (a slot pool of 10^8 slots or rank 10^8 ended in the allocator's
        # traceback); what fits the device is found when the pools are allocated.
        for name, value, most in (
            ("num_adapter_slots", self.engine.num_adapter_slots, MAX_ADAPTER_SLOTS),
            ("max_lora_rank", self.engine.max_lora_rank, MAX_LORA_RANK),
        ):
            if not 1 <= value <= most:
                raise ValueError(f"{name} must be in [1, {most}], got {value}")
        if self.disk_cache_bytes is not None and self.disk_cache_bytes < 0:
            raise ValueError(f"disk_cache_bytes must be >= 0, got {self.disk_cache_bytes}")
        if self.engine.host_cache_bytes is not None and self.engine.host_cache_bytes < 0:
            raise ValueError(f"host_cache_bytes must be >= 0, got {self.engine.host_cache_bytes}")
        if self.engine.dtype not in DTYPES:  # refused by the engine too, but only once the worker started
            raise ValueError(
                f"dtype must be auto or one of {', '.join(DTYPES[1:])}, got {self.engine.dtype!r}"
            )
        if (problem := quantize_problem(self.engine.quantize, self.engine.quantize_lm_head)) is not None:
            raise ValueError(problem)
        if not 0 <= self.metrics_port <= 65535:  # bind() raised OverflowError once the model was loaded
            raise ValueError(f"metrics_port must be in [0, 65535], got {self.metrics_port}")
        if (problem := address_problem(self.listen)) is not None:
            raise ValueError(f"listen {problem}")
        if self.http_listen and (problem := address_problem(self.http_listen)) is not None:
            raise ValueError(f"http_listen {problem}")
        if self.residency_interval_s <= 0:
            raise ValueError(f"residency_interval_s must be > 0, got {self.residency_interval_s}")

    @property
    def base_model_name(self) -> str:
        return self.model_name or Path(self.model_dir).name

    @property
    def artifacts_dir(self) -> Path:
        return Path(self.state_dir) / "artifacts"

    @property
    def usage_spool_path(self) -> Path:
        return Path(self.state_dir) / "usage_spool.jsonl"

    @property
    def usage_dead_letter_path(self) -> Path:
        """Usage records the control plane refused as invalid, beside the spool."""
        return Path(self.state_dir) / "usage_dead_letter.jsonl"

    @property
    def worker_id_path(self) -> Path:
        return Path(self.state_dir) / "worker_id"

    @property
    def worker_instance_path(self) -> Path:
        """The instance (process run) that last registered this state dir's worker."""
        return Path(self.state_dir) / "worker_instance"
