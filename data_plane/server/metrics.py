"""Prometheus metrics of one worker, on their own registry. No tenant or adapter labels: their number
is unbounded, and who used what is billing's business, not monitoring's."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
TIERS = ("none", "device", "host", "disk", "remote")
BACKGROUND_LOOPS = ("heartbeat", "hints", "residency")


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft_s = Histogram(
            "openlora_ttft_seconds", "Time to first token", buckets=_LATENCY_BUCKETS_S, registry=r
        )
        self.inter_token_s = Histogram(
            "openlora_inter_token_seconds",
            "Time between streamed tokens",
            buckets=_TOKEN_BUCKETS_S,
            registry=r,
        )
        self.queue_s = Histogram(
            "openlora_queue_seconds", "Arrival to first schedule", buckets=_LATENCY_BUCKETS_S, registry=r
        )
        self.e2e_s = Histogram(
            "openlora_e2e_latency_seconds", "Arrival to last token", buckets=_LATENCY_BUCKETS_S, registry=r
        )
        self.running = Gauge("openlora_running_requests", "Requests being decoded", registry=r)
        self.waiting = Gauge("openlora_waiting_requests", "Requests waiting for admission", registry=r)
        self.adapter_load_s = Histogram(
            "openlora_adapter_load_seconds",
            "Time bringing a request's adapters into device slots, by the tier they came from",
            ["tier"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.cache_lookups = Counter(
            "openlora_adapter_cache_lookups_total",
            "Adapter lookups by the tier the adapter was found in (device is a hit; others are misses above)",
            ["tier"],
            registry=r,
        )
        self.tokens_generated = Counter(
            "openlora_tokens_generated_total", "Completion tokens streamed", registry=r
        )
        self.requests = Counter(
            "openlora_requests_total", "Generate calls by final status", ["code"], registry=r
        )
        self.usage_dead_letter = Counter(
            "openlora_usage_dead_letter_total",
            "Usage records the control plane refused as invalid, moved to the dead-letter file",
            registry=r,
        )
        self.request_id_unchecked = Counter(
            "openlora_request_id_unchecked_total",
            "Client request ids served without the control plane's reservation (it was unreachable): "
            "a duplicate on another worker may then be served twice, never billed twice",
            registry=r,
        )
        self.background_errors = Counter(
            "openlora_background_errors_total",
            "Exceptions a background loop caught and survived, by loop",
            ["loop"],
            registry=r,
        )
        for tier in TIERS:
            self.cache_lookups.labels(tier)
        for loop in BACKGROUND_LOOPS:
            self.background_errors.labels(loop)

    def set_base_weights(self, weight_format: str, bits_per_weight: float, resident_bytes: int) -> None:
        """The base model's weight format (an info gauge), bits per weight of its decoder linears and
        resident bytes; set once at startup."""
        r = self.registry
        Gauge(
            "openlora_base_weight_format_info",
            "How the base model's weights are held (1 for the format in use)",
            ["format"],
            registry=r,
        ).labels(weight_format).set(1)
        Gauge(
            "openlora_base_weight_bits_per_weight",
            "Bits per weight of the decoder layers' linears, scales and offsets included",
            registry=r,
        ).set(bits_per_weight)
        Gauge("openlora_base_weight_bytes", "Base-model weight bytes resident on the device", registry=r).set(
            resident_bytes
        )

    def watch_engine_loads(
        self, read: Callable[[], tuple[Mapping[tuple[str, str], int], Mapping[tuple[str, str], float]]]
    ) -> None:
        """Exports the engine's own load counters (every load, prefetches included, not only the ones a
        request waited for) by cause ("request" or "prefetch") and source tier. `read` returns copies of
        (counts, milliseconds) keyed by (cause, tier); it is called at scrape time."""
        self.registry.register(_EngineLoadCollector(read))

    def serve_http(self, port: int, addr: str = "0.0.0.0") -> None:
        """Exposes /metrics on `port` (a daemon thread of prometheus-client)."""
        start_http_server(port, addr=addr, registry=self.registry)


class _EngineLoadCollector:
    def __init__(self, read) -> None:
        self._read = read

    def collect(self):
        counts, ms_sums = self._read()
        loads = CounterMetricFamily(
            "openlora_engine_adapter_loads", "Adapter loads into device slots", labels=["cause", "tier"]
        )
        seconds = CounterMetricFamily(
            "openlora_engine_adapter_load_seconds",
            "Time the loader spent on adapter loads (read + copy)",
            labels=["cause", "tier"],
        )
        for (cause, tier), count in sorted(counts.items()):
            loads.add_metric([cause, tier], count)
            seconds.add_metric([cause, tier], ms_sums.get((cause, tier), 0.0) / 1000)
        yield loads
        yield seconds
