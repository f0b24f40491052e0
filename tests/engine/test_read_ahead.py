"""A request's adapter is read from disk from its arrival (`LLMEngine.read_ahead`, called by the async
engine as a request comes in, while a step runs), not from the step boundary at which the engine takes the
request in: its load then finds the read done (a copy, admitted in the engine's first step, as a copy from
host memory is) or under way (taken over, never read twice). A read ahead of an adapter invalidated
meanwhile is dropped."""

from __future__ import annotations

from concurrent.futures import wait

import pytest

from data_plane.engine import adapter_loader
from openlora.cache_scope import content_of

from .conftest import block_disk_reads, greedy, make_engine

PROMPT = [3, 1, 4, 1, 5]
READ_DELAY_S = 0.3  # a slow disk: a read spans several steps of the tiny model


@pytest.fixture
def engine(tiny_llama):
    engine = make_engine(tiny_llama, num_adapter_slots=2, adapter_read_delay_s=READ_DELAY_S)
    reads = []
    read = engine.loader._read
    engine.loader._read = lambda members: reads.append(members) or read(members)
    engine.reads = reads
    yield engine
    engine.shutdown()


def _reads_ahead_done(engine) -> None:
    _, running = wait([entry[0] for entry in engine.loader._ahead.values()], timeout=10)
    assert not running


def test_a_request_whose_adapter_was_read_ahead_runs_in_the_engines_first_step(engine, tiny_llama):
    request = greedy("r", PROMPT, [tiny_llama.ref("r8_all")], max_tokens=2)
    assert engine.read_ahead(request) == 1
    _reads_ahead_done(engine)
    engine.add_request(request)
    first = [out for out in engine.step() if out.request_id == "r"]
    assert first and first[0].new_token_ids, "the request was not admitted in the first step"
    assert len(engine.reads) == 1
    assert engine.read_ahead(request) == 0  # in a slot now: nothing to read


def test_a_load_submitted_while_its_read_ahead_runs_takes_it_over(engine, tiny_llama):
    """Without the read ahead the request waits for a whole read from the step that took it in."""
    ref = tiny_llama.ref("r16_rslora")
    request = greedy("r", PROMPT, [ref], max_tokens=2)
    assert engine.read_ahead(request) == 1
    assert engine.read_ahead(request) == 0  # one read per adapter
    engine.add_request(request)
    tokens = []
    while engine.has_unfinished():
        tokens += [t for out in engine.step() for t in out.new_token_ids]
    assert len(tokens) == 2 and len(engine.reads) == 1
    assert engine.loader.num_read_ahead == 0


def test_a_read_ahead_of_an_invalidated_adapter_is_dropped_and_read_again(engine, tiny_llama):
    ref = tiny_llama.ref("r4_qv")
    request = greedy("r", PROMPT, [ref], max_tokens=2)
    engine.read_ahead(request)
    _reads_ahead_done(engine)
    engine.invalidate(ref.key)
    engine.step()  # applies the invalidation
    assert engine.loader.num_read_ahead == 0
    engine.add_request(request)
    while engine.has_unfinished():
        engine.step()
    assert len(engine.reads) == 2


def test_a_read_ahead_of_content_invalidated_before_its_request_arrived_is_dropped(engine, tiny_llama):
    """The cache does not know the key of a read ahead until its request is taken in: invalidating the
    content must reach the read all the same."""
    ref = tiny_llama.ref("r4_qv")
    engine.read_ahead(greedy("r", PROMPT, [ref], max_tokens=2))
    engine.invalidate_content(content_of(ref.key))
    engine.step()
    assert engine.loader.num_read_ahead == 0


def test_reads_ahead_are_bounded_in_number_and_in_size(engine, tiny_llama, monkeypatch):
    names = ["r4_qv", "r8_all", "r16_rslora", "r64_all"]
    requests = [greedy(f"r{i}", PROMPT, [tiny_llama.ref(n)], max_tokens=1) for i, n in enumerate(names)]
    monkeypatch.setattr(adapter_loader, "MAX_READS_AHEAD", 3)
    assert [engine.read_ahead(r) for r in requests] == [1, 1, 1, 0]
    _reads_ahead_done(engine)
    engine.loader._ahead.clear()
    monkeypatch.setattr(adapter_loader, "MAX_READ_AHEAD_BYTES", 1)
    engine.read_ahead(requests[0])
    _reads_ahead_done(engine)
    assert len(engine.reads) == 3  # the adapter past the byte bound was left to its load


def test_a_read_ahead_of_a_linear_mix_is_dropped_with_its_member(engine, tiny_llama):
    """A linear mix's key is dropped with a member through `_mix_members`, which only loads fill: the
    mix's read ahead (its key unknown to the cache and to `_mix_members`) stayed until claimed or timed
    out (its buffer outside every budget)."""
    mix = [tiny_llama.ref("r16_rslora", 0.5), tiny_llama.ref("r8_all", 0.5)]
    assert engine.read_ahead(greedy("m", PROMPT, mix, max_tokens=2)) == 1
    _reads_ahead_done(engine)
    engine.invalidate(mix[1].key)
    engine.step()
    assert engine.loader.num_read_ahead == 0
    engine.read_ahead(greedy("m2", PROMPT, mix, max_tokens=2))
    _reads_ahead_done(engine)
    engine.invalidate_content(content_of(mix[0].key))
    engine.step()
    assert engine.loader.num_read_ahead == 0


def test_a_dropped_read_ahead_not_begun_never_takes_the_disk_thread(engine, tiny_llama):
    first, second = tiny_llama.ref("r4_qv"), tiny_llama.ref("r8_all")
    assert engine.read_ahead(greedy("a", PROMPT, [first], max_tokens=1)) == 1
    assert engine.read_ahead(greedy("b", PROMPT, [second], max_tokens=1)) == 1  # behind the first
    engine.invalidate(second.key)
    engine.step()
    engine.loader._pool.submit(lambda: None).result(timeout=10)  # the disk thread's queue has drained
    assert [members[0].key for members in engine.reads] == [first.key]


def test_a_load_taking_over_its_read_waits_for_that_read_alone(engine, tiny_llama):
    """A load that took over a read still under way was queued on the disk thread behind every read ahead
    begun after it: its request was admitted only once the reads of later arrivals were done too."""
    first, second, third = (tiny_llama.ref(n) for n in ("r4_qv", "r8_all", "r16_rslora"))
    for i, ref in enumerate((first, second, third)):
        assert engine.read_ahead(greedy(f"x{i}", PROMPT, [ref], max_tokens=1)) == 1
    engine.add_request(greedy("a", PROMPT, [first], max_tokens=2))  # its read is under way
    while not any(out.request_id == "a" and out.new_token_ids for out in engine.step()):
        pass
    assert [members[0].key for members in engine.reads][:1] == [first.key]
    assert engine.loader._ahead.keys() == {second.key, third.key}
    assert len(engine.reads) < 3, "admitted only once the later reads ahead were done"


def test_a_read_under_way_when_a_step_starts_is_awaited_so_its_request_runs_in_that_step(tiny_llama):
    """A read still running when the step begins used to cost its request the whole step (it was admitted
    in the next one); the step now waits for it as for a copy from host memory (at most 10 ms on its own:
    here the read ends because the step waits)."""
    engine = make_engine(tiny_llama, num_adapter_slots=2)
    try:
        released = block_disk_reads(engine)
        wait_for = engine.loader.wait_for
        awaited = []

        def waiting(keys, timeout_s):
            awaited.append(set(keys))
            released.set()  # the read ends while the step waits (the test's long timeout: a loaded CI box)
            wait_for(keys, 30.0)

        engine.loader.wait_for = waiting
        ref = tiny_llama.ref("r16_rslora")
        engine.add_request(greedy("r", PROMPT, [ref], max_tokens=2))
        first = [out for out in engine.step() if out.request_id == "r"]
        assert awaited == [{ref.key}]
        assert first and first[0].new_token_ids, "the request was not admitted in the step that waited"
    finally:
        engine.shutdown()


def test_a_slow_read_is_awaited_by_one_step_only(tiny_llama):
    engine = make_engine(tiny_llama, num_adapter_slots=2)
    released = block_disk_reads(engine)
    try:
        wait_for = engine.loader.wait_for
        awaited = []
        engine.loader.wait_for = lambda keys, timeout_s: (
            awaited.append(set(keys)) or wait_for(keys, timeout_s)
        )
        engine.add_request(greedy("busy", PROMPT, max_tokens=6))  # the base model: steps go on
        ref = tiny_llama.ref("r16_rslora")
        engine.add_request(greedy("r", PROMPT, [ref], max_tokens=2))
        for _ in range(3):
            engine.step()
        assert awaited == [{ref.key}]  # the first step waited 10 ms for it, the others did not
        released.set()
        outputs = []
        while engine.has_unfinished():
            outputs += engine.step()
        assert [out for out in outputs if out.request_id == "r" and out.finish_reason]
    finally:
        released.set()
        engine.shutdown()
