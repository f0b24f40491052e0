"""The engine steps with the intra-op thread count it was built with, on any thread, and capping the
adapter loader's threads leaves every other thread's count alone (data_plane/engine/intra_op.py)."""

from __future__ import annotations

import threading

import pytest
import torch

from data_plane.engine.intra_op import process_default, threads, use_threads
from tests.engine.conftest import greedy, make_engine, run_to_completion

# Neither 1 (the loader's) nor this machine's core count: a count no thread takes unless told to.
COUNT = 3


def on_thread(fn):
    result: list = []
    thread = threading.Thread(target=lambda: result.append(fn()))
    thread.start()
    thread.join()
    return result[0]


@pytest.fixture
def default_of_three():
    """The process default (and this thread's count) at COUNT for the test, then as it was."""
    before_default, before_here = process_default(), torch.get_num_threads()
    torch.set_num_threads(COUNT)
    yield
    torch.set_num_threads(before_here)
    on_thread(lambda: torch.set_num_threads(before_default))


def test_use_threads_sets_the_calling_thread_only(default_of_three):
    def capped():
        use_threads(1)
        return torch.get_num_threads()

    assert on_thread(capped) == 1
    assert process_default() == COUNT  # a thread started afterwards is not capped
    assert on_thread(torch.get_num_threads) == COUNT
    assert torch.get_num_threads() == COUNT


def test_threads_capping_themselves_at_once_leave_the_default_alone(default_of_three):
    """The loader's two threads cap themselves as they start, often together: one that read the default
    while the other had it at one put back one, and every thread started after ran on one thread."""
    start = threading.Barrier(8)
    counts: list[int] = []

    def capped():
        start.wait()
        use_threads(1)
        counts.append(torch.get_num_threads())

    for _ in range(40):
        threads = [threading.Thread(target=capped) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert process_default() == COUNT
    assert counts == [1] * 320


def test_a_block_on_one_thread_gives_back_the_threads_own_count_and_leaves_the_default(default_of_three):
    """What quantizing at load and training the demo model use: the block computes on one thread; the
    thread's own count comes back after it, and the default is never changed for other threads."""

    def in_and_after_a_block():
        use_threads(2)
        with threads(1):
            inside = torch.get_num_threads(), process_default()
        return inside, torch.get_num_threads()

    assert on_thread(in_and_after_a_block) == ((1, COUNT), 2)
    assert process_default() == COUNT


def test_with_no_thread_to_spare_the_calling_thread_is_still_set(default_of_three, monkeypatch):
    """A process at its thread limit: the default can be neither read nor put back, yet the caller's count
    is set and nothing raises (the loader's threads set theirs as they start: raising there would make
    every adapter load fail)."""

    class NoThread(threading.Thread):
        def start(self):
            raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading, "Thread", NoThread)
    assert process_default() is None
    use_threads(2)
    assert torch.get_num_threads() == 2
    with threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_a_new_thread_stepping_the_engine_uses_the_engines_count(default_of_three, tiny_llama):
    engine = make_engine(tiny_llama)
    try:
        assert engine.intra_op_threads == COUNT
        # The first request on an adapter starts the loader's threads, which cap themselves at one.
        engine.add_request(greedy("warm", [1, 2, 3], adapters=[tiny_llama.ref("r8_all")], max_tokens=2))
        run_to_completion(engine)
        assert engine.loader.num_in_flight == 0
        assert process_default() == COUNT

        # Another thread takes a count of its own, then steps the engine: the step uses the engine's.
        def step_on_a_capped_thread():
            use_threads(2)
            engine.add_request(greedy("next", [4, 5, 6], adapters=[tiny_llama.ref("r4_qv")], max_tokens=2))
            results = run_to_completion(engine)
            return torch.get_num_threads(), results

        threads, results = on_thread(step_on_a_capped_thread)
        assert threads == COUNT
        assert len(results["next"][0]) == 2

        # A thread that never set a count gets the engine's too (not the loader's one thread).
        def step_on_a_new_thread():
            engine.add_request(greedy("third", [7, 8], max_tokens=1))
            run_to_completion(engine)
            return torch.get_num_threads()

        assert on_thread(step_on_a_new_thread) == COUNT
    finally:
        engine.shutdown()
