"""The Prometheus scrape endpoint (one per process)."""

from __future__ import annotations

from prometheus_client import start_http_server

from openlora.listen import listen_error

_started_ports: set[int] = set()


def start_metrics_server(
    port: int, addr: str = "0.0.0.0", flag: str = "--metrics-port (OPENLORA_METRICS_PORT)"
) -> None:
    """Serves /metrics on addr:port once per process. Raises ListenError naming the address and `flag`
    when the port cannot be bound."""
    if port not in _started_ports:
        try:
            start_http_server(port, addr=addr)
        except OSError as error:
            raise listen_error(f"{addr}:{port}", flag, error.strerror or str(error)) from None
        _started_ports.add(port)
