"""AdapterCache tiers without torch: slots, host budget, references, keep-warm, cost-based eviction."""

from __future__ import annotations

import pytest

from data_plane.engine.adapter_cache import MIN_WAIT_SAMPLES, AdapterCache, AdapterState, TierCost


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def _cache(slots=2, host_bytes=0, clock=None, **kwargs) -> AdapterCache:
    return AdapterCache(slots, host_bytes, clock=clock or FakeClock(), **kwargs)


def _load(cache: AdapterCache, key: str) -> int:
    slot, _ = cache.admit(key)
    cache.mark_ready(key)
    return slot


def test_evicted_adapter_with_a_host_copy_moves_down_to_host():
    cache = _cache(slots=1, host_bytes=100)
    _load(cache, "a")
    assert cache.store_host("a", 40) == []
    assert cache.tier_of("a") == "device"
    slot, evicted = cache.admit("b")
    assert evicted == "a" and slot == 0
    assert cache.tier_of("a") == "host" and cache.on_host("a") and cache.state("a") is None
    assert cache.tier_of("b") == "disk"  # still loading: a request would wait for the disk load
    cache.mark_ready("b")
    assert cache.tier_of("b") == "device"


def test_evicted_adapter_without_host_copy_leaves_the_cache():
    cache = _cache(slots=1)
    _load(cache, "a")
    cache.admit("b")
    assert cache.tier_of("a") == "disk" and not cache.on_host("a")


def test_host_budget_is_kept_by_evicting_host_copies():
    cache = _cache(host_bytes=100)
    assert cache.store_host("a", 60) == []
    assert cache.host_used_bytes == 60
    assert cache.store_host("b", 60) == ["a"]
    assert cache.host_used_bytes == 60 and cache.host_keys() == ["b"]
    assert cache.store_host("huge", 101) is None  # never fits: no host copy
    assert cache.host_keys() == ["b"]


def test_host_copy_being_copied_into_a_slot_is_not_evicted():
    cache = _cache(host_bytes=100)
    cache.store_host("a", 60)
    cache.admit("a")  # LOADING from its host copy
    assert not cache.can_host("b", 60)
    assert cache.store_host("b", 60) is None
    assert not cache.drop_host("a")
    cache.mark_ready("a")
    assert cache.store_host("b", 60) == ["a"]


def test_keep_warm_adapters_never_leave_host_memory():
    cache = _cache(host_bytes=100)
    cache.set_keep_warm("warm", "id-1", True)
    cache.store_host("warm", 60)
    assert cache.store_host("other", 60) is None
    assert cache.host_keys() == ["warm"]
    cache.store_host("small", 40)
    assert sorted(cache.host_keys()) == ["small", "warm"]
    assert cache.store_host("next", 40) == ["small"]


def test_keep_warm_holds_while_any_adapter_of_the_key_asks_for_it():
    """Public content is one key under every name holding it: one name turning keep-warm off must not
    unpin it for another that still asks, and the last one off unpins it."""
    cache = _cache(host_bytes=100)
    cache.set_keep_warm("shared", "id-a", True)
    cache.set_keep_warm("shared", "id-b", True)
    cache.set_keep_warm("shared", "id-a", False)
    cache.store_host("shared", 60)
    assert cache.is_keep_warm("shared")
    assert cache.store_host("other", 60) is None
    cache.set_keep_warm("shared", "id-b", False)
    assert not cache.is_keep_warm("shared")
    assert cache.store_host("other", 60) == ["shared"]


def test_keep_warm_turned_off_for_a_key_the_cache_dropped_does_not_make_it_again():
    cache = _cache(host_bytes=100)
    cache.set_keep_warm("gone", "id-a", True)
    cache.invalidate("gone")
    cache.set_keep_warm("gone", "id-a", False)
    assert "gone" not in cache.known_keys()


def test_keep_warm_copies_past_half_the_host_budget_are_ranked_like_the_rest():
    """Any tenant may mark its adapters keep-warm: ten of them filled the whole tier for good, and every
    other adapter was refused a host copy. The oldest keep-warm copies up to half the budget stay pinned;
    the later ones make room like any copy."""
    cache = _cache(host_bytes=100)
    for i in range(10):
        cache.set_keep_warm(f"warm-{i}", f"id-{i}", True)
        assert cache.store_host(f"warm-{i}", 10) == []
    evicted = cache.store_host("other", 40)
    assert evicted is not None and len(evicted) == 4
    assert all(int(key.split("-")[1]) >= 5 for key in evicted)  # the first five (half the tier) stay
    assert {f"warm-{i}" for i in range(5)} <= set(cache.host_keys())
    assert cache.on_host("other")


def test_referenced_adapter_keeps_its_slot_until_released():
    cache = _cache(slots=1)
    _load(cache, "a")
    cache.acquire("a")
    cache.acquire("a")
    assert cache.refcount("a") == 2 and not cache.can_admit("b") and not cache.evict("a")
    cache.release("a")
    assert not cache.can_admit("b")
    cache.release("a")
    assert cache.can_admit("b")
    with pytest.raises(RuntimeError):
        cache.release("a")


def test_loading_adapter_is_never_evicted():
    cache = _cache(slots=1)
    cache.admit("a")
    assert not cache.can_admit("b") and not cache.evict("a")


def test_cost_based_eviction_keeps_the_frequent_adapter_that_lru_would_evict():
    clock = FakeClock()
    cache = _cache(slots=2, clock=clock, rate_time_constant_s=60.0)
    _load(cache, "hot")
    _load(cache, "once")
    for _ in range(20):  # hot: called every second for 20 s
        cache.acquire("hot")
        cache.release("hot")
        clock.now_s += 1
    cache.acquire("once")  # once: called a single time, most recently
    cache.release("once")
    # LRU would evict "hot" (least recently used); expected cost keeps it.
    _, evicted = cache.admit("new")
    assert evicted == "once"


def _one_on_host_one_on_disk_only() -> AdapterCache:
    """Two full slots of equal demand and size, equal tier costs: "on_host" (most recent) has a host copy,
    "disk_only" none."""
    costs = {"host": TierCost(bytes_per_ms=1000.0, fixed_ms=0.0), "disk": TierCost(1000.0, 0.0)}
    cache = _cache(slots=2, host_bytes=10_000, clock=FakeClock(), tier_costs=costs)
    _load(cache, "on_host")
    _load(cache, "disk_only")
    cache.store_host("on_host", 100)
    cache.record_size("disk_only", 100)
    for key in ("disk_only", "on_host"):
        cache.acquire(key)
        cache.release(key)
    return cache


def test_cost_based_eviction_prefers_the_adapter_cheap_to_bring_back():
    cache = _one_on_host_one_on_disk_only()
    cache.record_load("disk", 100, 10.0)  # disk turns out slow: 10 bytes/ms
    assert cache.reload_cost_ms("disk_only", "device") > cache.reload_cost_ms("on_host", "device")
    _, evicted = cache.admit("new")
    assert evicted == "on_host"  # recency alone would have evicted disk_only
    assert cache.tier_of("on_host") == "host"


def test_what_requests_waited_per_tier_prices_a_slot_by_the_tier_it_would_fall_to():
    """A copy from host memory and a read from disk both take a few ms, but requests served from disk wait
    a step longer: once measured, that wait is what losing a slot without a host copy costs."""
    cache = _one_on_host_one_on_disk_only()
    assert cache.reload_cost_ms("disk_only", "device") == cache.reload_cost_ms("on_host", "device") == 0.1
    for i in range(MIN_WAIT_SAMPLES):
        cache.record_wait("device", 20.0)
        cache.record_wait("host", 21.0)
        if i < MIN_WAIT_SAMPLES - 1:
            cache.record_wait("disk", 45.0)
    assert cache.wait_penalty_ms("disk") == 0.0  # too few samples yet: the load costs alone
    cache.record_wait("disk", 45.0)
    assert cache.wait_penalty_ms("disk") == pytest.approx(25.0)
    assert cache.wait_penalty_ms("host") == pytest.approx(1.0)
    assert cache.reload_cost_ms("disk_only", "device") == pytest.approx(25.0)
    assert cache.reload_cost_ms("on_host", "device") == pytest.approx(1.0)
    assert cache.reload_cost_ms("disk_only", "disk") == pytest.approx(0.1)  # host memory's: the read
    _, evicted = cache.admit("new")
    assert evicted == "on_host"  # recency alone would have evicted disk_only
    cache.record_wait("device", 80.0)  # a penalty is never below zero, nor a cost below the load's
    assert cache.wait_penalty_ms("host") >= 0.0 and cache.reload_cost_ms("disk_only", "device") >= 0.1


def test_prewarm_deadline_protects_an_adapter_until_its_call():
    clock = FakeClock()
    cache = _cache(slots=2, clock=clock)
    _load(cache, "periodic")
    _load(cache, "recent")
    cache.acquire("recent")
    cache.release("recent")
    cache.hint("periodic", clock.now_s + 5)  # predicted call in 5 s
    assert cache.predicted_reuse_per_s("periodic") > cache.predicted_reuse_per_s("recent")
    _, evicted = cache.admit("new")
    assert evicted == "recent"
    clock.now_s += 5
    cache.acquire("periodic")  # the call came: the deadline is spent
    cache.release("periodic")
    clock.now_s += 3600
    assert cache.predicted_reuse_per_s("periodic") < 1e-3


def test_prefetch_reserves_a_slot_without_a_reference_and_demote_frees_it():
    clock = FakeClock()
    cache = _cache(slots=1, host_bytes=100, clock=clock)
    slot = cache.prefetch("a", deadline_at_s=1010.0)
    assert slot == 0 and cache.refcount("a") == 0 and cache.state("a") is AdapterState.LOADING
    assert cache.prefetch("a") is None
    cache.store_host("a", 10)
    cache.mark_ready("a")
    clock.now_s = 1021.0  # the predicted call never came and the hint's window closed
    assert cache.demote("a")
    assert cache.tier_of("a") == "host" and cache.can_admit("b")


def test_invalidate_drops_every_tier_at_once_or_when_the_last_user_releases():
    cache = _cache(slots=2, host_bytes=100)
    _load(cache, "idle")
    cache.store_host("idle", 10)
    assert cache.invalidate("idle")
    assert cache.tier_of("idle") == "disk" and cache.host_used_bytes == 0 and cache.can_admit("x")
    _load(cache, "busy")
    cache.acquire("busy")
    assert not cache.invalidate("busy")
    assert cache.slot_of("busy") is not None  # the running request finishes on it
    cache.release("busy")
    assert cache.state("busy") is None and cache.tier_of("busy") == "disk"
    assert len(cache._free_slots) == 2


def test_measured_loads_update_the_reload_cost():
    cache = _cache(host_bytes=1000)
    cache.store_host("a", 1000)
    before = cache.reload_cost_ms("a", "disk")
    for _ in range(20):
        cache.record_load("disk", 1000, 1000.0)
    assert cache.reload_cost_ms("a", "disk") > before
