"""How OpenLoRA's long-lived gRPC channels reconnect to a peer that went away.

A gRPC channel whose peer is unreachable retries the connection with exponential backoff: 1 s, then 1.6x
each attempt, up to 120 s. Until its next attempt the channel stays in TRANSIENT_FAILURE and fails every
call at once with UNAVAILABLE, even after the peer is back. A worker whose control plane was down for
half a minute (a restart, a deploy) therefore went on refusing new callers for up to about as long again
after the control plane served again ("control plane unavailable (Authorize: UNAVAILABLE)"), and a
client of a restarted worker did the same.

Every channel OpenLoRA holds to one of its own servers (the worker's to its control plane, `up`'s while
it waits for its children, `Client`, `AdminClient`) reconnects at least once a RECONNECT_BACKOFF_MAX_S
instead: the peer is one known address, an attempt on a closed port costs one refused SYN, and a second
of unavailability after a peer's return is what a caller's "retry shortly" can absorb.
"""

from __future__ import annotations

RECONNECT_BACKOFF_INITIAL_S = 0.2
RECONNECT_BACKOFF_MAX_S = 1.0


def reconnect_options() -> list[tuple[str, int]]:
    """Channel arguments that bound the wait between connection attempts (gRPC adds up to 20% jitter)."""
    return [
        ("grpc.initial_reconnect_backoff_ms", int(RECONNECT_BACKOFF_INITIAL_S * 1000)),
        ("grpc.max_reconnect_backoff_ms", int(RECONNECT_BACKOFF_MAX_S * 1000)),
    ]
