"""settle_heap: a server's startup heap frozen out of later collections, what comes after collected."""

from __future__ import annotations

import gc
import weakref

from openlora.gc_tuning import settle_heap


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def _cycle() -> weakref.ref:
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def test_the_startup_heap_is_frozen_and_later_cycles_are_still_collected():
    try:
        before = _cycle()  # garbage from before: the full collection frees it, it is not frozen
        frozen = settle_heap()
        assert before() is None
        # frozen objects freed by reference counting since (other threads run) leave the count
        assert 0 < gc.get_freeze_count() <= frozen
        after = _cycle()
        assert after() is not None  # a cycle needs the collector, not reference counts
        gc.collect()
        assert after() is None  # made after the freeze: collected as before
    finally:
        gc.unfreeze()
