"""A prewarmed adapter stays warm until its predicted call: eviction order, demotes, the hint's window."""

from __future__ import annotations

from data_plane.engine.adapter_cache import AdapterCache


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def _cache(slots=2, host_bytes=0, clock=None) -> AdapterCache:
    return AdapterCache(slots, host_bytes, clock=clock or FakeClock())


def _use(cache: AdapterCache, key: str) -> None:
    """One finished request for `key` in a slot."""
    if cache.state(key) is None:
        cache.admit(key)
        cache.mark_ready(key)
    cache.acquire(key)
    cache.release(key)


def test_next_prewarm_evicts_an_unhinted_host_copy_not_the_previous_prewarm():
    clock = FakeClock()
    cache = _cache(slots=1, host_bytes=100, clock=clock)
    for _ in range(5):  # "old" was used often: a higher rate than either prewarmed adapter
        _use(cache, "old")
    cache.store_host("old", 40)
    cache.hint("a", clock.now_s + 2.0)
    assert cache.store_host("a", 40) == []
    clock.now_s += 0.5
    cache.hint("b", clock.now_s + 2.0)
    assert cache.store_host("b", 40) == ["old"]
    assert sorted(cache.host_keys()) == ["a", "b"]


def test_unhinted_adapter_never_takes_the_host_copy_of_a_prewarmed_one():
    clock = FakeClock()
    cache = _cache(host_bytes=80, clock=clock)
    cache.hint("a", clock.now_s + 2.0)
    cache.hint("b", clock.now_s + 3.0)
    cache.store_host("a", 40)
    cache.store_host("b", 40)
    for _ in range(10):
        _use(cache, "busy")
    assert cache.store_host("busy", 40) is None  # no host copy; it is used from its slot
    assert sorted(cache.host_keys()) == ["a", "b"]


def test_prewarm_due_sooner_takes_the_host_copy_of_one_due_later():
    clock = FakeClock()
    cache = _cache(host_bytes=80, clock=clock)
    cache.hint("later", clock.now_s + 20.0)
    cache.hint("soon", clock.now_s + 10.0)
    cache.store_host("later", 40)
    cache.store_host("soon", 40)
    cache.hint("now", clock.now_s + 1.0)
    assert cache.store_host("now", 40) == ["later"]
    cache.hint("even_later", clock.now_s + 30.0)
    assert cache.store_host("even_later", 40) is None  # would only push out adapters needed sooner


def test_protection_ends_when_the_predicted_call_comes_even_early():
    clock = FakeClock()
    cache = _cache(clock=clock)
    cache.hint("a", clock.now_s + 2.0)
    assert cache.is_protected("a")
    clock.now_s += 1.9  # the call comes a little before the predicted time
    _use(cache, "a")
    assert not cache.is_protected("a")


def test_protection_of_a_late_call_ends_after_the_hints_lead_past_the_deadline():
    clock = FakeClock()
    cache = _cache(clock=clock)
    cache.hint("a", clock.now_s + 2.0)  # lead 2 s: kept for a late call until 2 s past the deadline
    clock.now_s += 3.9
    assert cache.is_protected("a")
    clock.now_s += 0.2
    assert not cache.is_protected("a")
    assert cache.predicted_reuse_per_s("a") == 0.0


def test_demote_leaves_a_prewarmed_adapter_in_its_slot():
    clock = FakeClock()
    cache = _cache(clock=clock)
    cache.prefetch("a", clock.now_s + 2.0)
    cache.mark_ready("a")
    assert not cache.demote("a")
    assert cache.tier_of("a") == "device" and cache.is_protected("a")
    _use(cache, "a")  # its call came: a later demote lets it go
    assert cache.demote("a")
    assert cache.tier_of("a") == "disk"


def test_prewarmed_adapter_in_a_slot_is_evicted_after_unhinted_ones():
    clock = FakeClock()
    cache = _cache(slots=2, clock=clock)
    cache.prefetch("prewarmed", clock.now_s + 5.0)
    cache.mark_ready("prewarmed")
    for _ in range(20):
        _use(cache, "popular")
    _, evicted = cache.admit("new")
    assert evicted == "popular"
    assert cache.tier_of("prewarmed") == "device"
