"""The Prometheus scrape endpoint (one per process)."""

from __future__ import annotations

from prometheus_client import start_http_server

_started_ports: set[int] = set()


def start_metrics_server(port: int, addr: str = "0.0.0.0") -> None:
    if port not in _started_ports:
        start_http_server(port, addr=addr)
        _started_ports.add(port)
