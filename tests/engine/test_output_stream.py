"""OutputStream: a lagging consumer takes what accumulated as one output; the first token and errors alone."""

from __future__ import annotations

import asyncio

from data_plane.engine.errors import EngineDead, StepFailed
from data_plane.engine.output_stream import OutputStream
from data_plane.engine.request import RequestOutput


def _out(ids: list[int], text: str = "", finished: bool = False, error=None, total_ms: float = 0.0):
    return RequestOutput(
        request_id="r",
        new_token_ids=ids,
        new_text=text,
        new_logprobs=[-0.5 * t for t in ids] if ids else None,
        finished=finished,
        finish_reason="length" if finished else None,
        prompt_tokens=3,
        completion_tokens=0,
        queue_ms=1.0,
        adapter_load_ms=2.0,
        ttft_ms=3.0,
        total_ms=total_ms,
        cache_tier="host" if finished else "disk",
        error=error,
    )


def _take_all(stream: OutputStream) -> list:
    """Takes until nothing waits (a take never blocks while something does)."""

    async def go():
        taken = []
        while len(stream):
            taken.append(await stream.get())
        return taken

    return asyncio.run(go())


def test_first_token_goes_alone_and_the_rest_is_merged_in_order():
    stream = OutputStream()
    for i, out in enumerate(
        [_out([7], "a"), _out([8], "b"), _out([9], "c"), _out([10], "d", True, total_ms=9)]
    ):
        stream.put(out)
        assert len(stream) == i + 1
    first, rest = _take_all(stream)
    assert first.new_token_ids == [7] and first.new_text == "a" and first.new_logprobs == [-3.5]
    assert rest.new_token_ids == [8, 9, 10] and rest.new_text == "bcd"
    assert rest.new_logprobs == [-4.0, -4.5, -5.0]
    # finish, timings and tier come from the last output merged
    assert (
        rest.finished and rest.finish_reason == "length" and rest.total_ms == 9 and rest.cache_tier == "host"
    )


def test_outputs_before_the_first_token_go_with_it_and_later_takes_merge():
    stream = OutputStream()
    stream.put(_out([]))  # e.g. a prefill chunk: nothing to send yet
    stream.put(_out([1], "x"))
    stream.put(_out([2], "y"))
    first, rest = _take_all(stream)
    assert first.new_token_ids == [1] and first.new_text == "x"
    assert rest.new_token_ids == [2] and rest.new_text == "y"
    stream.put(_out([3], "z"))
    stream.put(_out([4], "w"))
    (merged,) = _take_all(stream)
    assert merged.new_token_ids == [3, 4] and merged.new_text == "zw"


def test_an_error_is_never_merged_the_tokens_before_it_come_first():
    stream = OutputStream()
    failed = StepFailed("step failed")
    for out in (_out([1]), _out([2]), _out([3]), _out([], finished=True, error=failed)):
        stream.put(out)
    stream.put(EngineDead("gone"))
    first, tokens, error_output, dead = _take_all(stream)
    assert first.new_token_ids == [1] and tokens.new_token_ids == [2, 3] and tokens.error is None
    assert error_output.error is failed
    assert isinstance(dead, EngineDead)


def test_logprobs_stay_none_when_no_output_has_them():
    stream = OutputStream()
    for ids in ([1], [2], [3]):
        out = _out(ids)
        out.new_logprobs = None
        stream.put(out)
    _, rest = _take_all(stream)
    assert rest.new_token_ids == [2, 3] and rest.new_logprobs is None


def test_a_waiting_consumer_wakes_once_and_takes_everything_put_before_it_runs():
    async def go():
        stream = OutputStream()
        stream.put(_out([1]))
        first = await stream.get()
        taking = asyncio.ensure_future(stream.get())
        await asyncio.sleep(0)  # the consumer now waits
        assert not taking.done()
        stream.put(_out([2]))  # one engine step's delivery callback puts several outputs in a row
        stream.put(_out([3]))
        stream.put(_out([4], finished=True))
        return first, await taking, len(stream)

    first, merged, left = asyncio.run(go())
    assert first.new_token_ids == [1]
    assert merged.new_token_ids == [2, 3, 4] and merged.finished and left == 0


def test_past_the_first_token_a_consumer_wakes_once_the_interval_of_tokens_waits():
    async def go():
        stream = OutputStream(interval=3)
        taking = asyncio.ensure_future(stream.get())
        await asyncio.sleep(0)
        stream.put(_out([]))  # nothing to send: no wake
        await asyncio.sleep(0)
        assert not taking.done() and not stream.ready
        stream.put(_out([1], "a"))  # the first token: at once, alone
        first = await taking
        taking = asyncio.ensure_future(stream.get())
        for ids in ([2], [3]):
            stream.put(_out(ids))
            await asyncio.sleep(0)
            assert not taking.done()  # one and two tokens wait: held back
        stream.put(_out([4, 5]))  # four wait: the interval is reached
        merged = await taking
        taking = asyncio.ensure_future(stream.get())
        stream.put(_out([6]))
        await asyncio.sleep(0)
        assert not taking.done()
        stream.put(_out([7], finished=True))  # the end is never held back
        return first, merged, await taking, len(stream)

    first, merged, last, left = asyncio.run(go())
    assert first.new_token_ids == [1] and first.new_text == "a"
    assert merged.new_token_ids == [2, 3, 4, 5] and not merged.finished
    assert last.new_token_ids == [6, 7] and last.finished and left == 0


def test_an_error_wakes_a_consumer_held_by_the_interval_and_the_tokens_before_it_come_first():
    async def go():
        stream = OutputStream(interval=8)
        stream.put(_out([1]))
        first = await stream.get()
        taking = asyncio.ensure_future(stream.get())
        stream.put(_out([2]))
        await asyncio.sleep(0)
        assert not taking.done()
        stream.put(StepFailed("step failed"))
        tokens = await taking
        return first, tokens, await stream.get(), stream.ready

    first, tokens, error, ready = asyncio.run(go())
    assert first.new_token_ids == [1] and tokens.new_token_ids == [2]
    assert isinstance(error, StepFailed) and not ready


def test_an_interval_below_one_is_refused():
    import pytest

    with pytest.raises(ValueError, match="interval"):
        OutputStream(interval=0)
