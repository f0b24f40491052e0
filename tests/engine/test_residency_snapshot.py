"""Other threads (the worker heartbeat, the Redis residency publisher) read which adapters are where from
a snapshot the engine thread publishes, never from the cache's tables while the engine thread changes them.

Regression: they iterated the adapter cache's dicts from the event loop while the engine thread mutated
them, and died on `RuntimeError: dictionary changed size during iteration` (or read an empty list).
"""

from __future__ import annotations

import sys
import threading

from data_plane.engine.async_engine import AsyncEngine

from .conftest import greedy, make_engine

NUM_PERMANENT = 500


def test_residency_reads_from_another_thread_never_raise_while_the_cache_changes(tiny_llama):
    engine = make_engine(tiny_llama, num_adapter_slots=8, host_cache_bytes=1 << 40)
    cache = engine.adapter_cache
    permanent = [f"p{i}" for i in range(NUM_PERMANENT)]
    for key in permanent:
        cache.store_host(key, 1)
    for i in range(4):
        cache.admit(f"d{i}")
        cache.mark_ready(f"d{i}")
    front = AsyncEngine(engine=engine)
    stop = threading.Event()

    def engine_thread() -> None:  # what the engine thread does to the cache under load
        i = 0
        while not stop.is_set():
            key = f"churn{i % 64}"
            if cache.on_host(key):
                cache.drop_host(key)
            else:
                cache.store_host(key, 1)
            slot_key = f"s{i % 3}"
            if cache.state(slot_key) is None and cache.can_admit(slot_key):
                cache.admit(slot_key)
                cache.mark_ready(slot_key)
            else:
                cache.evict(slot_key)
            i += 1

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    writer = threading.Thread(target=engine_thread)
    writer.start()
    try:
        for _ in range(100):
            host = front.host_adapter_keys()
            device = front.resident_adapter_keys()
            assert set(permanent) <= set(host)  # a whole snapshot, never a fallback or a partial read
            assert {f"d{i}" for i in range(4)} <= set(device)
    finally:
        stop.set()
        writer.join()
        sys.setswitchinterval(old_interval)
        engine.shutdown()
    assert sorted(front.host_adapter_keys()) == sorted(cache.host_keys())
    assert sorted(front.resident_adapter_keys()) == sorted(cache.resident_keys())


def test_request_counts_read_from_another_thread_never_raise_while_the_queue_changes(tiny_llama):
    """The worker's gauges, its engine watch and each call's queue check read the running and waiting
    counts from other threads. Regression: counting iterated the waiting deque while the engine thread
    added and removed requests, and raised `RuntimeError: deque mutated during iteration` (a call failed
    as INTERNAL; the engine watch died, and a dead engine was never reported NOT_SERVING)."""
    engine = make_engine(tiny_llama, max_waiting=10_000)
    front = AsyncEngine(engine=engine)
    num_kept = 200
    for i in range(num_kept):
        engine.add_request(greedy(f"kept{i}", [1, 2, 3]))
    stop = threading.Event()

    def engine_thread() -> None:  # requests arrive and leave behind those that wait
        i = 0
        while not stop.is_set():
            engine.add_request(greedy(f"churn{i}", [4, 5, 6]))
            if i % 2:
                engine.abort(f"churn{i - 1}")
                engine.abort(f"churn{i}")
            i += 1

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    writer = threading.Thread(target=engine_thread)
    writer.start()
    try:
        for _ in range(2_000):
            assert num_kept <= front.num_waiting <= num_kept + 2
            assert front.num_running == 0
    finally:
        stop.set()
        writer.join()
        sys.setswitchinterval(old_interval)
        engine.shutdown()
