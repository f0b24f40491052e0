"""The host tier ranks adapters by expected reuse value per byte (long-horizon request rate x reload cost
from disk / size): under memoryless long-tail traffic the adapters most likely to be called stay, which a
recency order does not give."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from data_plane.engine.adapter_cache import AdapterCache


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def _call(cache: AdapterCache, key: str, size_bytes: int) -> bool:
    """One request for `key`, served from host memory if there (returns True), else read from disk and
    offered to the host tier."""
    hit = cache.on_host(key)
    cache.record_use(key)
    if not hit:
        cache.store_host(key, size_bytes)
    return hit


def test_a_once_called_adapter_does_not_push_out_adapters_called_more_often():
    clock = FakeClock()
    cache = AdapterCache(1, 300, clock=clock)
    for _ in range(5):
        for key in ("a", "b", "c"):
            _call(cache, key, 100)
            clock.now_s += 600
    clock.now_s += 3600
    assert not _call(cache, "once", 100)  # the most recent, but called once: no host copy
    assert sorted(cache.host_keys()) == ["a", "b", "c"]
    assert cache.host_value_per_byte("once") < min(cache.host_value_per_byte(k) for k in "abc")


def test_the_least_value_per_byte_goes_first_whatever_its_recency():
    clock = FakeClock()
    cache = AdapterCache(1, 300, clock=clock)
    for key, size in (("small", 50), ("big", 200)):  # equal demand, "big" the more recent
        for _ in range(2):
            _call(cache, key, size)
            clock.now_s += 1
    for _ in range(3):
        cache.record_use("mid")
    assert cache.host_value_per_byte("big") < cache.host_value_per_byte("small")
    assert cache.store_host("mid", 100) == ["big"]
    assert sorted(cache.host_keys()) == ["mid", "small"]


def test_under_poisson_traffic_the_host_tier_keeps_the_likeliest_adapters_and_beats_lru():
    rng = np.random.default_rng(7)
    rates_per_hour = {f"tail{i}": 0.25 + 0.25 * i for i in range(12)}  # 0.25 to 3 calls an hour
    num_hosted, size = 4, 100
    events = []
    for key, rate in rates_per_hour.items():
        t = 0.0
        while (t := t + rng.exponential(3600 / rate)) < 48 * 3600:
            events.append((t, key))
    events.sort()
    clock = FakeClock()
    cache = AdapterCache(1, num_hosted * size, clock=clock)
    lru: OrderedDict[str, None] = OrderedDict()
    hits = lru_hits = 0
    for t, key in events:
        clock.now_s = 1000.0 + t
        hits += _call(cache, key, size)
        lru_hits += key in lru
        lru[key] = None
        lru.move_to_end(key)
        if len(lru) > num_hosted:
            lru.popitem(last=False)
    likeliest = sorted(rates_per_hour, key=rates_per_hour.get)[-num_hosted:]
    assert sorted(cache.host_keys()) == sorted(likeliest)
    assert hits > lru_hits


def test_past_the_idle_bound_a_flood_of_once_used_keys_leaves_the_records_worth_keeping():
    """Usage records of keys in no tier are bounded; the ones a flood of distinct keys (a linear mix per
    weight) pushes out are the least valuable, never a key called often, kept warm or prewarmed."""
    clock = FakeClock()
    cache = AdapterCache(1, 0, clock=clock, max_idle_usage_records=8)
    for _ in range(3):
        cache.record_use("often")
    cache.set_keep_warm("pinned", "adapter-1", True)
    cache.hint("prewarmed", clock.now_s + 60)
    for i in range(100):
        clock.now_s += 0.01
        cache.record_use(f"mix:{i}")
    known = cache.known_keys()
    assert len(known) <= 8 + 2  # within the bound, and the kept-warm and prewarmed keys besides
    assert {"often", "pinned", "prewarmed", "mix:99"} <= set(known)
    assert cache.is_keep_warm("pinned") and cache.is_protected("prewarmed")


def test_records_that_must_stay_do_not_make_every_new_key_scan_them_all(monkeypatch):
    """A trim scans and sorts every record; kept-warm and prewarmed keys in no tier stay through it. Past a
    quarter of the bound of those, each new key (each new linear mix) would trim again on the engine
    thread: trims stay one per quarter of the bound of new keys, and the idle records within the bound."""
    clock = FakeClock()
    bound = 40
    cache = AdapterCache(1, 0, clock=clock, max_idle_usage_records=bound)
    for i in range(bound // 2):
        cache.hint(f"prewarmed:{i}", clock.now_s + 3600)
    trims = 0
    trim = cache._trim_idle_usage

    def counted_trim(keep: str) -> None:
        nonlocal trims
        trims += 1
        trim(keep)

    monkeypatch.setattr(cache, "_trim_idle_usage", counted_trim)
    new_keys = 10 * bound
    for i in range(new_keys):
        clock.now_s += 0.01
        cache.record_use(f"mix:{i}")
    assert trims <= new_keys // (bound // 4) + 1
    assert len(cache.known_keys()) <= bound + bound // 2 + 1
    assert all(cache.is_protected(f"prewarmed:{i}") for i in range(bound // 2))
