"""The delays `openlora up` waits before starting a dead worker again."""

from __future__ import annotations

import itertools

from openlora.commands.up import (
    RESTART_BACKOFF_MAX_S,
    RESTART_BACKOFF_MIN_S,
    RESTART_BACKOFF_RESET_S,
    _Backoff,
)


def test_restart_delay_doubles_up_to_the_cap_while_workers_die_young():
    backoff = _Backoff()
    delays = [backoff.next_delay_s(ran_s=1.0) for _ in range(10)]
    assert delays[:4] == [RESTART_BACKOFF_MIN_S * 2**i for i in range(4)]
    assert all(b == min(a * 2, RESTART_BACKOFF_MAX_S) for a, b in itertools.pairwise(delays))
    assert delays[-1] == RESTART_BACKOFF_MAX_S


def test_restart_delay_falls_back_to_the_minimum_after_a_long_healthy_run():
    backoff = _Backoff()
    for _ in range(5):
        backoff.next_delay_s(ran_s=1.0)
    assert backoff.next_delay_s(ran_s=RESTART_BACKOFF_RESET_S) == RESTART_BACKOFF_MIN_S
    assert backoff.next_delay_s(ran_s=1.0) == RESTART_BACKOFF_MIN_S * 2
