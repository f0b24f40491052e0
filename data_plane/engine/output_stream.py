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

`interval` (the worker's --stream-interval, default 1): after the first token, a waiting consumer is woken
only once `interval` tokens wait, or the request finished, or an error came; so each message carries at
least `interval` tokens but the last, and the serving path does its per-message work (a task woken, a
message built and written) that many times less. The first token, the last output and errors are never
held back.

Event-loop only: not thread-safe.
"""

from __future__ import annotations

import asyncio
import dataclasses
from itertools import chain

from data_plane.engine.request import RequestOutput

Item = RequestOutput | BaseException


def _is_final(item: Item) -> bool:
    """An item never held back for the interval: an exception, an output with an error, the last output."""
    return isinstance(item, BaseException) or item.error is not None or item.finished


class OutputStream:
    def __init__(self, interval: int = 1) -> None:
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        self._interval = interval
        self._items: list[Item] = []
        self._waiter: asyncio.Future | None = None
        self._sent_token = False  # whether an output with a token has been taken
        self._tokens = 0  # tokens in self._items
        self._finals = 0  # items in self._items that `_is_final`

    def __len__(self) -> int:
        """Items waiting for the consumer."""
        return len(self._items)

    @property
    def ready(self) -> bool:
        """Whether a `get` returns at once: something waits, and (past the first token) it is at least
        `interval` tokens, or the end, or an error."""
        if not self._items:
            return False
        return (
            self._interval == 1
            or self._finals > 0
            or self._tokens >= self._interval
            or (self._tokens > 0 and not self._sent_token)
        )

    def put(self, item: Item) -> None:
        """Adds an output (or an exception ending the stream); wakes a waiting consumer once it is `ready`,
        once however many items arrive before it runs."""
        self._items.append(item)
        if _is_final(item):
            self._finals += 1
        elif not isinstance(item, BaseException):
            self._tokens += len(item.new_token_ids)
        waiter = self._waiter
        if waiter is not None and not waiter.done() and self.ready:
            waiter.set_result(None)

    async def get(self) -> Item:
        """The next item: the outputs waiting, merged, or an exception (returned, not raised)."""
        while not self.ready:
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
            self._finals -= 1
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
        for out in run:
            if out.finished:
                self._finals -= 1
            else:
                self._tokens -= len(out.new_token_ids)
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
