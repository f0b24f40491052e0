"""Prometheus metrics of the control plane (no tenant or adapter labels: bounded cardinality)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

RPC_REQUESTS = Counter(
    "openlora_cp_rpc_requests", "RPCs served, by method and status code", ["method", "code"]
)
RPC_SECONDS = Histogram("openlora_cp_rpc_duration_seconds", "RPC latency, by method", ["method"])
USAGE_EVENTS_INSERTED = Counter("openlora_cp_usage_events_inserted", "Usage events newly recorded")
USAGE_EVENTS_DUPLICATE = Counter(
    "openlora_cp_usage_events_duplicate", "Usage events ignored because their request id was recorded"
)
HINTS_PUBLISHED = Counter(
    "openlora_cp_hints_published", "Hints written to the Redis stream, by kind", ["kind"]
)
HINTS_FAILED = Counter(
    "openlora_cp_hints_failed", "Hints not published (Redis unreachable), by kind", ["kind"]
)
