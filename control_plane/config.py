"""The control plane's one frozen configuration, built once at the entry point (see openlora.config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from control_plane.prediction.demand import PredictorConfig
from openlora.adapter_format import DEFAULT_MAX_RANK, DEFAULT_MAX_SIZE_BYTES
from openlora.grpc_limits import DEFAULT_MAX_CONNECTIONS
from openlora.listen import address_problem

DEFAULT_LISTEN = "127.0.0.1:50051"


@dataclass(frozen=True)
class ControlPlaneConfig:
    database_url: str
    state_dir: Path
    worker_token: str
    listen: str = DEFAULT_LISTEN
    # None: no hints are published (Redis is advisory).
    redis_url: str | None = None
    # The bootstrap admin key of the operator tenant; None: generate one on first start.
    admin_key: str | None = None
    # Apply pending migrations at start; False: refuse to start when the schema is behind.
    migrate: bool = True
    # Prometheus endpoint port; 0: off.
    metrics_port: int = 0
    max_lora_rank: int = DEFAULT_MAX_RANK
    max_adapter_size_bytes: int = DEFAULT_MAX_SIZE_BYTES
    heartbeat_interval_ms: int = 5000
    authorize_cache_ttl_ms: int = 5000
    grace_period_s: float = 5.0
    # Seconds between prediction passes over usage (prewarm/demote hints); 0 disables. Needs redis_url.
    predictor_interval_s: float = 5.0
    # What the passes predict from (rate window, lead time, thresholds, history horizon).
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    # Connections the gRPC server holds at once (see openlora.grpc_limits).
    max_connections: int = DEFAULT_MAX_CONNECTIONS

    def __post_init__(self) -> None:
        if not self.database_url:
            raise ValueError("database_url is required")
        if not self.worker_token or len(self.worker_token) < 16:
            raise ValueError("worker_token must be at least 16 characters")
        if self.admin_key is not None and len(self.admin_key) < 16:
            raise ValueError("admin_key must be at least 16 characters")
        if (problem := address_problem(self.listen)) is not None:
            raise ValueError(f"listen {problem}")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be 0..65535, got {self.metrics_port}")
        if self.max_lora_rank < 1:
            raise ValueError("max_lora_rank must be positive")
        if self.max_adapter_size_bytes < 1:
            raise ValueError("max_adapter_size_bytes must be positive")
        if not 0 < self.authorize_cache_ttl_ms <= 10_000:
            raise ValueError("authorize_cache_ttl_ms must be in 1..10000")
        if self.heartbeat_interval_ms < 100:
            raise ValueError("heartbeat_interval_ms must be at least 100")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {self.max_connections}")
        if self.predictor_interval_s < 0:
            raise ValueError(f"predictor_interval_s must be >= 0, got {self.predictor_interval_s}")
