"""The garbage collector of a long-running server: the heap it built to start left out of collections.

A server's heap is mostly what it built at startup and keeps until it exits (SQLAlchemy's mappings and
statement caches, gRPC's and protobuf's tables, a worker's model modules and tokenizer), and each request
allocates short-lived objects on top. CPython's cyclic collector walks the young generations every 700
net allocations and, as survivors accumulate, the whole heap: a profile of the control plane under the
serving benchmark (`perf record` during `python -m benchmarks.serving_overhead`, benchmarks/RESULTS.md) had
about a sixth of its CPU in the collector. `settle_heap()` runs once a server is up: one full collection,
then `gc.freeze()`, which moves every object alive at that moment into a permanent generation that later
collections skip. What is allocated afterwards is collected as before; the frozen objects are never freed by
the collector (reference counting still frees those that form no cycle), which a server that keeps its
startup state until it exits does not miss.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)


def settle_heap() -> int:
    """One full collection, then every surviving object frozen out of later collections; returns how many
    objects were frozen."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.debug("garbage collector: %d objects of the startup heap frozen out of collections", frozen)
    return frozen
