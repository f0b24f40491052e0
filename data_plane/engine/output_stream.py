"""OutputStream: one request's outputs on the event loop, coalesced for a consumer that lags.

The engine thread hands each step's outputs to the event loop in one callback, which `put`s each into its
request's stream. `get` returns everything that accumulated since the consumer last took, merged into one
RequestOutput, so a slow consumer sends one message for several steps instead of one per step:

    outputs o1..on waiting, none with an error  ->  one output with
        new_token_ids = o1.ids + ... + on.ids, new_text = o1.text + ... + on.text,
        new_logprobs  = o1.logprobs + ... + on.logprobs (None when none has any),
        everything else (finished, finish_reason, counts, timings, cache_tier) from on.

Two boundaries keep what the caller sees exact: the first output that carries a token is returned alone,
so the first token leaves at once (TTFT is never traded for batching), and an error (an engine fault, or
an output whose `error` is set) is never merged: the outputs before it are returned first, the error by
the next `get`, so the tokens made before a fault still reach (and are billed to) the caller.

Event-loop only: not thread-safe.
"""

from __future__ import annotations

import asyncio
import dataclasses
from itertools import chain

from data_plane.engine.request import RequestOutput

Item = RequestOutput | BaseException


class OutputStream:
    def __init__(self) -> None:
        self._items: list[Item] = []
        self._waiter: asyncio.Future | None = None
        self._sent_token = False  # whether an output with a token has been taken

    def __len__(self) -> int:
        """Items waiting for the consumer."""
        return len(self._items)

    def put(self, item: Item) -> None:
        """Adds an output (or an exception ending the stream); wakes a waiting consumer once, however many
        items arrive before it runs."""
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> Item:
        """The next item: the outputs waiting, merged, or an exception (returned, not raised)."""
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._take()

    def _take(self) -> Item:
        items = self._items
        first = items[0]
        if isinstance(first, BaseException) or first.error is not None:
            del items[0]
            return first
        end = 0  # items[:end] are merged
        while end < len(items):
            item = items[end]
            if isinstance(item, BaseException) or item.error is not None:
                break
            end += 1
            if item.new_token_ids and not self._sent_token:
                break  # the first token goes alone
        run = items[:end]
        del items[:end]
        if any(out.new_token_ids for out in run):
            self._sent_token = True
        return run[0] if len(run) == 1 else merge(run)


def merge(outputs: list[RequestOutput]) -> RequestOutput:
    """Consecutive outputs of one request as one: ids, text and logprobs concatenated, the rest from the
    last."""
    last = outputs[-1]
    has_logprobs = any(out.new_logprobs is not None for out in outputs)
    return dataclasses.replace(
        last,
        new_token_ids=list(chain.from_iterable(out.new_token_ids for out in outputs)),
        new_text="".join(out.new_text for out in outputs),
        new_logprobs=(
            list(chain.from_iterable(out.new_logprobs or () for out in outputs)) if has_logprobs else None
        ),
        new_text_offsets=(
            list(chain.from_iterable(out.new_text_offsets or () for out in outputs)) if has_logprobs else None
        ),
    )
