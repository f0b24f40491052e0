"""Prometheus metrics of one worker, on their own registry. No tenant or adapter labels: their number
is unbounded, and who used what is billing's business, not monitoring's. One exception, for routing:
`vllm:lora_requests_info` carries the adapter names in flight as label values of its single series,
the form the Gateway API Inference Extension reads (see `watch_routing_load`)."""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from openlora.listen import listen_error

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
TIERS = ("none", "device", "host", "disk", "remote")
BACKGROUND_LOOPS = ("heartbeat", "hints", "residency", "engine_watch")


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._http_server = None  # serve_http's, once it serves
        r = self.registry
        self.ttft_s = Histogram(
            "openlora_ttft_seconds", "Time to first token", buckets=_LATENCY_BUCKETS_S, registry=r
        )
        self.inter_token_s = Histogram(
            "openlora_inter_token_seconds",
            "Mean time between the tokens of a streamed message (one sample per message; a lagging stream gets several tokens per message)",
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
        self.early_start = Counter(
            "openlora_auth_early_start_total",
            "Calls started on a recent (no longer fresh) authorization while Authorize asked again, by what "
            "the fresh answer said: confirmed, changed (started over on it) or refused",
            ["outcome"],
            registry=r,
        )
        self.background_errors = Counter(
            "openlora_background_errors_total",
            "Exceptions a background loop caught and survived, by loop",
            ["loop"],
            registry=r,
        )
        self.merge_build_s = Histogram(
            "openlora_merge_build_seconds",
            "Time building a merged adapter (TIES, DARE, magnitude pruning) from its sources",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.merge_truncation_error = Histogram(
            "openlora_merge_truncation_error_ratio",
            "Relative Frobenius error of each built merge's re-factorization to the slot rank",
            buckets=(0.0001, 0.001, 0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0),
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

    def watch_prefetches(self, read: Callable[[], Mapping[tuple[str, str], int]]) -> None:
        """Exports the engine's prefetch accounting (`LLMEngine.prefetch_stats`, called at scrape time):
        `openlora_prefetch_total{tier}` prefetch loads performed into "host" memory or a "device" slot,
        `openlora_prefetch_wasted_total{tier}` those that left the tier before any request used them, and
        `openlora_prefetch_skipped_total{reason}` prefetches not started ("held": already there or warmer,
        or loading; "no_room": the host tier could not keep it until its predicted use)."""
        self.registry.register(_PrefetchCollector(read))

    def watch_routing_load(
        self, read: Callable[[], EngineLoad], activity: AdapterActivity, max_lora: int
    ) -> None:
        """Exports the gauges the Gateway API Inference Extension's endpoint picker scrapes from model
        servers, under vLLM's names: `vllm:num_requests_waiting`, `vllm:num_requests_running`,
        `vllm:gpu_cache_usage_perc` and `vllm:kv_cache_usage_perc` (a fraction in [0, 1], as vLLM's), and
        `vllm:lora_requests_info{max_lora, running_lora_adapters, waiting_lora_adapters}` whose value is
        the time (Unix seconds) the adapter lists last changed. `read` is called at scrape time from the
        scraping thread; `activity` holds the adapter names of the requests in flight."""
        self.registry.register(_RoutingCollector(read, activity, max_lora))

    def serve_http(
        self, port: int, addr: str = "0.0.0.0", flag: str = "--metrics-port (OPENLORA_METRICS_PORT)"
    ) -> None:
        """Exposes /metrics on `port` (a daemon thread of prometheus-client). Raises ListenError naming
        the address and `flag` when the port cannot be bound."""
        try:
            self._http_server, _ = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as error:
            raise listen_error(f"{addr}:{port}", flag, error.strerror or str(error)) from None

    def close_http(self) -> None:
        """Stops serving /metrics and frees its port (a worker stopped inside a longer-lived process, as in
        the tests, kept both until the process exited)."""
        server, self._http_server = self._http_server, None
        if server is not None:
            server.shutdown()
            server.server_close()


@dataclass(frozen=True)
class EngineLoad:
    """The engine's load at one instant, read from any thread."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # used KV blocks / all KV blocks, in [0, 1]


@dataclass(frozen=True)
class AdapterNames:
    """Sorted distinct adapter names of the requests running and waiting, and when they last changed."""

    running: tuple[str, ...] = ()
    waiting: tuple[str, ...] = ()
    updated_at: float = 0.0  # Unix seconds


class AdapterActivity:
    """The adapter names of the requests in flight, waiting (submitted, nothing generated yet) or running
    (generating). Names, not content hashes: a router matches them against the `model` of a request.

    Changed on the event loop only; other threads read `names`, an immutable snapshot replaced by one
    attribute store after every change (as the adapter cache publishes its residency). Each name is counted
    over the requests that name it, so a change costs its own names, not a walk over every request in
    flight, and a new snapshot is made only when a name joins or leaves a set."""

    def __init__(self) -> None:
        self._requests: dict[int, tuple[frozenset[str], bool]] = {}  # handle -> (names, running)
        self._handles = itertools.count()
        self._counts: dict[bool, collections.Counter[str]] = {
            False: collections.Counter(),
            True: collections.Counter(),
        }
        self.names = AdapterNames(updated_at=time.time())

    def add(self, names: Iterable[str]) -> int:
        """A request waiting for the engine; returns its handle."""
        handle = next(self._handles)
        request = frozenset(names)
        self._requests[handle] = (request, False)
        if self._count(request, False, +1):
            self._publish()
        return handle

    def mark_running(self, handle: int) -> None:
        names, running = self._requests.get(handle, (frozenset(), True))
        if not running:
            self._requests[handle] = (names, True)
            if self._count(names, False, -1) | self._count(names, True, +1):
                self._publish()

    def remove(self, handle: int) -> None:
        entry = self._requests.pop(handle, None)
        if entry is not None and self._count(*entry, -1):
            self._publish()

    def _count(self, names: frozenset[str], running: bool, step: int) -> bool:
        """Adds `step` to each name's count in the running or waiting set; whether a name joined or left it."""
        counts, changed = self._counts[running], False
        for name in names:
            counts[name] += step
            if counts[name] == 0:
                del counts[name]
                changed = True
            elif step > 0 and counts[name] == 1:
                changed = True
        return changed

    def _publish(self) -> None:
        self.names = AdapterNames(
            tuple(sorted(self._counts[True])), tuple(sorted(self._counts[False])), time.time()
        )


class _RoutingCollector:
    def __init__(self, read: Callable[[], EngineLoad], activity: AdapterActivity, max_lora: int) -> None:
        self._read = read
        self._activity = activity
        self._max_lora = max_lora

    def collect(self):
        load = self._read()
        names = self._activity.names
        yield GaugeMetricFamily(
            "vllm:num_requests_waiting",
            "Requests waiting for admission by the engine",
            value=load.num_waiting,
        )
        yield GaugeMetricFamily(
            "vllm:num_requests_running", "Requests the engine is decoding", value=load.num_running
        )
        for name in ("vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc"):
            yield GaugeMetricFamily(
                name, "KV-cache blocks in use, a fraction in [0, 1]", value=load.kv_cache_usage
            )
        info = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Adapters of the running and waiting requests (comma-separated names); value: when they last changed",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        info.add_metric(
            [str(self._max_lora), ",".join(names.running), ",".join(names.waiting)], names.updated_at
        )
        yield info


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


PREFETCH_TIERS = ("host", "device")
PREFETCH_SKIP_REASONS = ("held", "no_room")


class _PrefetchCollector:
    def __init__(self, read: Callable[[], Mapping[tuple[str, str], int]]) -> None:
        self._read = read

    def collect(self):
        stats = self._read()
        performed = CounterMetricFamily(
            "openlora_prefetch", "Prefetch loads performed, by the tier they filled", labels=["tier"]
        )
        wasted = CounterMetricFamily(
            "openlora_prefetch_wasted",
            "Prefetched copies that left their tier before any request used them",
            labels=["tier"],
        )
        skipped = CounterMetricFamily(
            "openlora_prefetch_skipped", "Prefetches not started, by reason", labels=["reason"]
        )
        for tier in PREFETCH_TIERS:
            performed.add_metric([tier], stats.get(("performed", tier), 0))
            wasted.add_metric([tier], stats.get(("wasted", tier), 0))
        reasons = sorted({*PREFETCH_SKIP_REASONS, *(r for event, r in stats if event == "skipped")})
        for reason in reasons:
            skipped.add_metric([reason], stats.get(("skipped", reason), 0))
        yield performed
        yield wasted
        yield skipped
