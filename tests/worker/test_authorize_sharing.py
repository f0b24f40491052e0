"""The worker's Authorize calls: concurrent callers of one key share one call, and an answer whose call
started before a forget (a revocation or deletion hint) is not cached."""

from __future__ import annotations

import asyncio

import pytest

from data_plane.server.control_plane_client import ControlPlaneClient, ControlPlaneError

from .conftest import BASE_MODEL, WORKER_TOKEN


class _CountingStub:
    """The real stub, with its Authorize calls counted."""

    def __init__(self, stub) -> None:
        self._stub = stub
        self.authorize_calls = 0

    def __getattr__(self, name):
        return getattr(self._stub, name)

    def Authorize(self, *args, **kwargs):  # the RPC's name
        self.authorize_calls += 1
        return self._stub.Authorize(*args, **kwargs)


def _client(system) -> tuple[ControlPlaneClient, _CountingStub]:
    client = ControlPlaneClient(system.control_plane.target, WORKER_TOKEN, auth_cache_ttl_s=5.0)
    counting = _CountingStub(client._stub)
    client._stub = counting
    return client, counting


def test_concurrent_callers_of_one_key_share_one_authorize_call(system):
    _, _, key = system.new_tenant()

    async def scenario():
        client, counting = _client(system)
        try:
            answers = await asyncio.gather(*(client.authorize(key, ("ad6",), BASE_MODEL) for _ in range(50)))
            other = await client.authorize(key, ("ad7",), BASE_MODEL)  # other names: its own call
            return answers, other, counting.authorize_calls
        finally:
            await client.close()

    answers, other, calls = system.loop.run(scenario())
    assert calls == 2
    assert all(a == answers[0] for a in answers)
    assert answers[0].adapters[0].sha256 == system.adapters["ad6"]
    assert other.adapters[0].sha256 == system.adapters["ad7"]


def test_a_caller_going_away_does_not_cancel_the_shared_call(system):
    _, _, key = system.new_tenant()

    async def scenario():
        client, counting = _client(system)
        try:
            first = asyncio.ensure_future(client.authorize(key, ("ad6",), BASE_MODEL))
            second = asyncio.ensure_future(client.authorize(key, ("ad6",), BASE_MODEL))
            await asyncio.sleep(0)
            first.cancel()
            answer = await second
            return answer, counting.authorize_calls
        finally:
            await client.close()

    answer, calls = system.loop.run(scenario())
    assert calls == 1 and answer.can_infer


def test_an_answer_asked_before_a_forget_is_not_cached_and_later_callers_ask_again(system):
    _, _, key = system.new_tenant()

    async def scenario():
        client, counting = _client(system)
        try:
            early = asyncio.ensure_future(client.authorize(key, ("ad6",), BASE_MODEL))
            await asyncio.sleep(0)  # its call is on the wire
            client.forget_adapter("", system.adapters["ad6"])  # a hint arrives meanwhile
            late = asyncio.ensure_future(client.authorize(key, ("ad6",), BASE_MODEL))
            await asyncio.gather(early, late)
            calls_after_both = counting.authorize_calls
            await client.authorize(key, ("ad6",), BASE_MODEL)  # cached now: from the call after the forget
            return calls_after_both, counting.authorize_calls
        finally:
            await client.close()

    calls_after_both, calls_after_third = system.loop.run(scenario())
    assert calls_after_both == 2  # the later caller did not join the call that predates the forget
    assert calls_after_third == 2


def test_a_refusal_reaches_every_caller_sharing_the_call(system):
    async def scenario():
        client, counting = _client(system)
        try:
            results = await asyncio.gather(
                *(client.authorize("olk_not_a_key", ("ad6",), BASE_MODEL) for _ in range(5)),
                return_exceptions=True,
            )
            return results, counting.authorize_calls
        finally:
            await client.close()

    results, calls = system.loop.run(scenario())
    assert calls == 1
    assert all(isinstance(r, ControlPlaneError) for r in results)
    assert {r.code.name for r in results} == {"UNAUTHENTICATED"}


@pytest.mark.parametrize("forget", ["names", "key_id"])
def test_every_forget_makes_the_next_caller_ask_again(system, forget):
    _, key_id, key = system.new_tenant()

    async def scenario():
        client, counting = _client(system)
        try:
            await client.authorize(key, ("ad6",), BASE_MODEL)
            await client.authorize(key, ("ad6",), BASE_MODEL)  # cached
            if forget == "names":
                client.forget_names(key, ("ad6",))
            else:
                client.forget_api_key_id(key_id)
            await client.authorize(key, ("ad6",), BASE_MODEL)
            return counting.authorize_calls
        finally:
            await client.close()

    assert system.loop.run(scenario()) == 2


@pytest.mark.parametrize("forget", ["other_keys_names", "stranger_refused"])
def test_another_keys_forgets_leave_this_keys_answer_cached(system, forget):
    """One tenant's NOT_FOUND names, or a stranger's refused key, forgot for every key: a victim's
    Authorize in flight was then not cached and its concurrent callers stopped sharing one call (5 round
    trips became 122 over 200 calls under an attacker's 404 loop)."""
    _, _, key = system.new_tenant()
    _, _, other_key = system.new_tenant()

    async def scenario():
        client, counting = _client(system)
        try:
            asked = asyncio.ensure_future(client.authorize(key, ("ad6",), BASE_MODEL))
            await asyncio.sleep(0)  # its call is on the wire
            if forget == "other_keys_names":
                client.forget_names(other_key, ("ad6",))
            else:
                client._forget_key("olk_not_a_key")
            joined = asyncio.ensure_future(client.authorize(key, ("ad6",), BASE_MODEL))
            await asyncio.gather(asked, joined)
            await client.authorize(key, ("ad6",), BASE_MODEL)  # the first call's answer, cached
            return counting.authorize_calls
        finally:
            await client.close()

    assert system.loop.run(scenario()) == 1


def test_a_flood_of_strangers_keys_cannot_reset_a_forget_a_call_in_flight_waits_on(system):
    """Per-key forget counts lived in an LRU of 1,024 keys: a stranger's 1,024 refused keys evicted a
    revoked key's count while its Authorize was in flight, and the answer from before the revocation was
    cached. Counts are now kept exactly while a key has a call in flight."""
    _, _, key = system.new_tenant()

    async def scenario():
        client, counting = _client(system)
        try:
            asked = asyncio.ensure_future(client.authorize(key, ("ad6",), BASE_MODEL))
            await asyncio.sleep(0)  # its call is on the wire
            client.forget_names(key, ("ad6",))  # this key's answers change while it is asked
            for i in range(2000):
                client._forget_key(f"olk_stranger_{i}")
            await asked
            await client.authorize(key, ("ad6",), BASE_MODEL)  # not cached: asked again
            return counting.authorize_calls, len(client._key_forgets)
        finally:
            await client.close()

    calls, counts_left = system.loop.run(scenario())
    assert calls == 2 and counts_left == 0


def test_a_key_answered_for_any_names_is_known_until_it_is_refused_or_revoked(system):
    """The HTTP API checks a key before reading its body; a key answered moments ago for other names
    (its last call's adapters) passes without another Authorize round trip."""
    _, key_id, key = system.new_tenant()

    async def scenario():
        client, _ = _client(system)
        try:
            before = client.knows_key(key)
            await client.authorize(key, ("ad6",), BASE_MODEL)
            known = client.knows_key(key)
            client.forget_api_key_id(key_id)
            revoked = client.knows_key(key)
            await client.authorize(key, ("ad7",), BASE_MODEL)
            client._forget_key(key)
            return before, known, revoked, client.knows_key(key)
        finally:
            await client.close()

    assert system.loop.run(scenario()) == (False, True, False, False)


def test_a_revocation_drops_its_keys_answers_without_reading_the_others(system):
    """Each revoke hint scanned every cached answer for the revoked key's id: a control plane's start
    republishes up to a thousand revocations, each a pass over up to ten thousand answers on the worker's
    event loop. The answers are indexed by key id; the others' stay cached."""
    _, key_id, key = system.new_tenant()
    other = system.new_tenant()[2]

    async def scenario():
        client, counting = _client(system)
        try:
            await client.authorize(key, ("ad6",), BASE_MODEL)
            await client.authorize(key, ("ad7",), BASE_MODEL)
            await client.authorize(other, ("ad6",), BASE_MODEL)
            cache = client._auth_cache

            class Unread(type(cache)):
                def items(self):
                    raise AssertionError("the whole cache was read")

                def values(self):
                    raise AssertionError("the whole cache was read")

                def __iter__(self):
                    raise AssertionError("the whole cache was read")

            cache.__class__ = Unread
            try:
                dropped = client.forget_api_key_id(key_id)
            finally:
                cache.__class__ = Unread.__mro__[1]
            calls = counting.authorize_calls
            await client.authorize(other, ("ad6",), BASE_MODEL)  # still cached
            await client.authorize(key, ("ad6",), BASE_MODEL)  # asked again
            return dropped, counting.authorize_calls - calls, client.knows_key(key), client.knows_key(other)
        finally:
            await client.close()

    assert system.loop.run(scenario()) == (2, 1, True, True)
