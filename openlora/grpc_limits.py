"""Connection limits of OpenLoRA's gRPC servers (the worker's and the control plane's).

A gRPC server accepts every TCP connection it is offered and keeps one that never speaks for two minutes
(its handshake timeout) with no cap on how many: a client with no key that opened 20,000 idle connections
took every file descriptor of a worker (new calls failed until it let go) and of the control plane (which
could no longer open database connections and went unhealthy). So each server

- holds at most `max_connections` connections at once (`grpc.max_allowed_incoming_connections`); the
  connections past it are closed as they arrive, and the ones it holds keep working;
- closes a connection that has not completed its HTTP/2 handshake within HANDSHAKE_TIMEOUT_S (the HTTP
  API gives a request's headers the same time);
- closes (GOAWAY) a connection that has carried no call for IDLE_CONNECTION_S; a client reconnects at its
  next call, so only a held-open idle connection notices;

and the process's open-file limit is raised (within its hard limit) to leave FD_RESERVE descriptors beyond
the connections it may hold (and, on a worker, its HTTP listener's), for its databases, spool and
artifact files. Where the hard limit is too low for that, the gRPC cap is lowered to its share of what is
left (in proportion to the HTTP listener's own limit, which uvicorn applies by answering 503 past it, not
by refusing sockets), and the log says so.

The cap keeps the process itself working through a flood (its database, its spool, the connections it
already holds); turning away one client's flood while serving another's new connections is per-address
accounting, which belongs to a proxy in front of the servers.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)

DEFAULT_MAX_CONNECTIONS = 4096
HANDSHAKE_TIMEOUT_S = 10.0
IDLE_CONNECTION_S = 300.0
# Descriptors kept beyond the connections: database pools, Redis, the usage spool, artifacts being read or
# written, adapter files, logs.
FD_RESERVE = 512
MIN_CONNECTIONS = 16


def fd_budget(wanted: int) -> int:
    """Raises this process's soft open-file limit towards `wanted` (never above the hard limit, never
    lowering it); returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (soft < wanted):
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if target > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError):
                pass
    return soft if soft != resource.RLIM_INFINITY else wanted


def connection_cap(max_connections: int, other_descriptors: int = 0, server: str = "gRPC") -> int:
    """The connection cap to apply: `max_connections`, or where the open-file limit cannot hold it with
    FD_RESERVE and `other_descriptors` (another listener's connections), its share of what the limit leaves
    after the reserve, in proportion to the two asks; at least MIN_CONNECTIONS."""
    limit = fd_budget(max_connections + other_descriptors + FD_RESERVE)
    share = (limit - FD_RESERVE) * max_connections // (max_connections + other_descriptors)
    cap = max(MIN_CONNECTIONS, min(max_connections, share))
    if cap < max_connections:
        log.warning(
            "%s server: at most %d connections (asked %d): the open-file limit is %d and %d descriptors are "
            "kept for the rest; raise the limit (ulimit -n) to hold more",
            server,
            cap,
            max_connections,
            limit,
            other_descriptors + FD_RESERVE,
        )
    return cap


def server_options(max_connections: int) -> list[tuple[str, int]]:
    """grpc.aio.server options for a server holding at most `max_connections` connections. SO_REUSEPORT
    off: gRPC sets it by default, and a second server on a port one already serves (a second control plane
    or worker started by mistake, a leftover process) then bound it without an error and took a share of
    its connections; now the bind fails and the second one says the port is in use."""
    return [
        ("grpc.so_reuseport", 0),
        ("grpc.max_allowed_incoming_connections", max_connections),
        ("grpc.server_handshake_timeout_ms", int(HANDSHAKE_TIMEOUT_S * 1000)),
        ("grpc.max_connection_idle_ms", int(IDLE_CONNECTION_S * 1000)),
    ]
