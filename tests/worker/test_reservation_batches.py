"""The worker's reservations of client request ids go to the control plane in batches: those asked for
while a call is under way travel together in the next ReserveRequestIds call, each caller gets its own
entry's answer, and a control plane that predates batches is asked one id at a time. Real gRPC servers on
loopback stand in for the control plane (their answers are the test's)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from data_plane.server.control_plane_client import ControlPlaneError
from openlora.v1 import worker_pb2, worker_pb2_grpc
from tests.worker.test_control_plane_client import _loopback

OK = grpc.StatusCode.OK.value[0]


def _outcome(request_id: str) -> worker_pb2.RequestIdOutcome:
    """The test's control plane: ids starting with "taken" are refused, "bad" ones are invalid, "odd" get
    a code no reservation answers with; the rest are reserved."""
    if request_id.startswith("taken"):
        code, message = grpc.StatusCode.ALREADY_EXISTS, f"request_id: {request_id!r} is already being served"
        return worker_pb2.RequestIdOutcome(code=code.value[0], message=message, field="request_id")
    if request_id.startswith("bad"):
        code = grpc.StatusCode.INVALID_ARGUMENT
        return worker_pb2.RequestIdOutcome(
            code=code.value[0], message="request_id: required", field="request_id"
        )
    if request_id.startswith("odd"):
        return worker_pb2.RequestIdOutcome(code=grpc.StatusCode.INTERNAL.value[0], message="internal error")
    return worker_pb2.RequestIdOutcome(code=OK)


class _Batching(worker_pb2_grpc.WorkerServiceServicer):
    """Answers ReserveRequestIds; the first call waits for `release`, so the callers that come meanwhile
    queue up for the next call."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.singles = 0
        self.release = asyncio.Event()

    async def ReserveRequestIds(self, request, context):
        self.batches.append([e.request_id for e in request.entries])
        if len(self.batches) == 1:
            await self.release.wait()
        return worker_pb2.ReserveRequestIdsResponse(
            outcomes=[_outcome(e.request_id) for e in request.entries]
        )

    async def ReserveRequestId(self, request, context):
        self.singles += 1
        return worker_pb2.ReserveRequestIdResponse()


async def _answers(client, request_ids: list[str]) -> list[object]:
    calls = [client.reserve_request_id("t1", r, "w1", 60_000) for r in request_ids]
    return await asyncio.gather(*calls, return_exceptions=True)


def test_reservations_asked_for_during_a_call_go_together_and_each_gets_its_own_answer():
    async def scenario():
        servicer = _Batching()
        async with _loopback(servicer) as client:
            first = asyncio.ensure_future(client.reserve_request_id("t1", "first", "w1", 60_000))
            while not servicer.batches:
                await asyncio.sleep(0.005)
            ids = [f"{kind}-{i}" for i in range(40) for kind in ("r", "taken", "bad", "odd")]
            rest = asyncio.ensure_future(_answers(client, ids))
            await asyncio.sleep(0.2)  # every caller is waiting behind the first call now
            servicer.release.set()
            await first
            return servicer, ids, await rest

    servicer, ids, answers = asyncio.run(scenario())
    assert servicer.batches[0] == ["first"]
    assert sum(len(b) for b in servicer.batches[1:]) == len(ids)
    assert len(servicer.batches) == 3  # 160 waiting callers: two calls of at most 128 entries
    assert servicer.singles == 0
    for request_id, answer in zip(ids, answers, strict=True):
        if request_id.startswith("r-"):
            assert answer is None
            continue
        assert isinstance(answer, ControlPlaneError), request_id
        expected = {
            "taken": grpc.StatusCode.ALREADY_EXISTS,
            "bad": grpc.StatusCode.INVALID_ARGUMENT,
            "odd": grpc.StatusCode.UNAVAILABLE,  # as a single call's server fault: the caller may retry
        }[request_id.split("-")[0]]
        assert answer.code == expected, request_id
        if expected == grpc.StatusCode.ALREADY_EXISTS:
            assert repr(request_id) in answer.message


def test_a_lone_reservation_is_sent_at_once():
    async def scenario():
        servicer = _Batching()
        servicer.release.set()
        async with _loopback(servicer) as client:
            await asyncio.wait_for(client.reserve_request_id("t1", "alone", "w1", 60_000), 5.0)
            with pytest.raises(ControlPlaneError) as refused:
                await client.reserve_request_id("t1", "taken-1", "w1", 60_000)
        return servicer, refused.value

    servicer, refused = asyncio.run(scenario())
    assert servicer.batches == [["alone"], ["taken-1"]]
    assert refused.code == grpc.StatusCode.ALREADY_EXISTS


def test_a_control_plane_without_batches_is_asked_one_id_at_a_time_from_then_on():
    class Older(worker_pb2_grpc.WorkerServiceServicer):
        def __init__(self) -> None:
            self.singles: list[str] = []

        async def ReserveRequestId(self, request, context):
            self.singles.append(request.request_id)
            if request.request_id.startswith("taken"):
                await context.abort(grpc.StatusCode.ALREADY_EXISTS, "request_id: already being served")
            return worker_pb2.ReserveRequestIdResponse()

    async def scenario():
        servicer = Older()
        async with _loopback(servicer) as client:
            first = await _answers(client, ["a", "taken-b", "c"])
            later = await _answers(client, ["d"])
            unsupported = client._batches_unsupported_until > asyncio.get_running_loop().time()
            return servicer, first, later, unsupported

    servicer, first, later, unsupported = asyncio.run(scenario())
    assert sorted(servicer.singles) == ["a", "c", "d", "taken-b"]
    assert first[0] is None and first[2] is None and later == [None]
    assert isinstance(first[1], ControlPlaneError) and first[1].code == grpc.StatusCode.ALREADY_EXISTS
    assert unsupported  # for a while (BATCHES_RETRY_S): asked again later, not never


@pytest.mark.parametrize("failure", ["unavailable", "short answer"])
def test_a_batch_call_that_fails_or_answers_short_is_unavailable_to_each_of_its_callers(failure):
    class Failing(worker_pb2_grpc.WorkerServiceServicer):
        async def ReserveRequestIds(self, request, context):
            if failure == "unavailable":
                await context.abort(grpc.StatusCode.UNAVAILABLE, "database down")
            return worker_pb2.ReserveRequestIdsResponse(outcomes=[worker_pb2.RequestIdOutcome(code=OK)])

    async def scenario():
        async with _loopback(Failing()) as client:
            return await _answers(client, ["a", "b", "c"])

    answers = asyncio.run(scenario())
    assert all(isinstance(a, ControlPlaneError) and a.code == grpc.StatusCode.UNAVAILABLE for a in answers)


class _Hung(worker_pb2_grpc.WorkerServiceServicer):
    """A control plane whose ReserveRequestIds calls never answer."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    async def ReserveRequestIds(self, request, context):
        self.batches.append([e.request_id for e in request.entries])
        await asyncio.Event().wait()


def test_closing_the_client_leaves_no_reservation_waiting_forever():
    async def scenario():
        servicer = _Hung()
        async with _loopback(servicer) as client:
            sent = asyncio.ensure_future(_answers(client, [f"s{i}" for i in range(5)]))
            while not servicer.batches:
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.05)
            more = asyncio.ensure_future(_answers(client, [f"m{i}" for i in range(300)]))
            await asyncio.sleep(0.05)
            await client.close()
            return await asyncio.wait_for(asyncio.gather(sent, more), 5.0)

    sent, more = asyncio.run(scenario())
    assert all(
        isinstance(a, ControlPlaneError) and a.code == grpc.StatusCode.UNAVAILABLE for a in sent + more
    )


def test_a_caller_that_gives_up_does_not_stop_the_others_answers():
    async def scenario():
        servicer = _Batching()
        async with _loopback(servicer) as client:
            blocker = asyncio.ensure_future(client.reserve_request_id("t1", "first", "w1", 60_000))
            while not servicer.batches:
                await asyncio.sleep(0.005)
            impatient = asyncio.ensure_future(client.reserve_request_id("t1", "gone", "w1", 60_000))
            patient = asyncio.ensure_future(client.reserve_request_id("t1", "taken-2", "w1", 60_000))
            await asyncio.sleep(0.05)
            impatient.cancel()
            servicer.release.set()
            await blocker
            with pytest.raises(ControlPlaneError) as refused:
                await asyncio.wait_for(patient, 5.0)
            return servicer, refused.value

    servicer, refused = asyncio.run(scenario())
    assert refused.code == grpc.StatusCode.ALREADY_EXISTS
    assert servicer.batches[1] == ["gone", "taken-2"]  # the request was sent; its answer is dropped


def test_behind_a_call_that_hangs_a_reservation_waits_its_own_deadline_not_that_calls_and_then_its_own(
    monkeypatch,
):
    """Each caller is answered UNAVAILABLE by its own deadline from when it asked, as a call of its own
    would be; one that asked while a hung call ran does not wait out that call and then its batch's."""
    from data_plane.server import control_plane_client

    monkeypatch.setattr(control_plane_client, "AUTHORIZE_TIMEOUT_S", 1.0)

    async def scenario():
        servicer = _Hung()
        async with _loopback(servicer) as client:
            loop = asyncio.get_running_loop()
            first = asyncio.ensure_future(_answers(client, ["first"]))
            await asyncio.sleep(0.2)
            asked = loop.time()
            later = await _answers(client, ["later"])
            waited = loop.time() - asked
            return servicer, await first, later, waited

    servicer, first, later, waited = asyncio.run(scenario())
    for answer in first + later:
        assert isinstance(answer, ControlPlaneError) and answer.code == grpc.StatusCode.UNAVAILABLE
    assert (
        waited < 1.5
    )  # its own 1 s deadline; behind the hung call: its last 0.8 s, then 1 s of its own batch
    assert servicer.batches[0] == ["first"]


class _Gated(worker_pb2_grpc.WorkerServiceServicer):
    """Calls with an id starting "block" wait for `release`; the others answer after `delay_s`, every id
    reserved. Records each call's ids and each release."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.batches: list[list[str]] = []
        self.released: list[str] = []
        self.release = asyncio.Event()
        self.delay_s = delay_s

    async def ReserveRequestIds(self, request, context):
        ids = [e.request_id for e in request.entries]
        self.batches.append(ids)
        if any(i.startswith("block") for i in ids):
            await self.release.wait()
        else:
            await asyncio.sleep(self.delay_s)
        return worker_pb2.ReserveRequestIdsResponse(
            outcomes=[worker_pb2.RequestIdOutcome(code=OK) for _ in ids]
        )

    async def ReleaseRequestId(self, request, context):
        self.released.append(request.request_id)
        return worker_pb2.ReleaseRequestIdResponse(released=True)


async def _occupy_every_call(client, servicer: _Gated) -> asyncio.Future:
    """MAX_RESERVATION_CALLS_IN_FLIGHT calls that wait for `servicer.release`: later entries wait."""
    from data_plane.server.control_plane_client import MAX_RESERVATION_CALLS_IN_FLIGHT

    blockers = []
    for i in range(MAX_RESERVATION_CALLS_IN_FLIGHT):
        blockers.append(asyncio.ensure_future(client.reserve_request_id("t1", f"block{i}", "w1", 60_000)))
        while len(servicer.batches) <= i:
            await asyncio.sleep(0.005)
    return asyncio.gather(*blockers)


def test_an_entry_whose_caller_gave_up_before_it_was_sent_is_never_sent():
    async def scenario():
        servicer = _Gated()
        async with _loopback(servicer) as client:
            blockers = await _occupy_every_call(client, servicer)
            gone = asyncio.ensure_future(client.reserve_request_id("t1", "gone", "w1", 60_000))
            kept = asyncio.ensure_future(client.reserve_request_id("t1", "kept", "w1", 60_000))
            await asyncio.sleep(0.05)
            gone.cancel()
            servicer.release.set()
            await blockers
            await asyncio.wait_for(kept, 5.0)
        return servicer

    servicer = asyncio.run(scenario())
    sent = [i for batch in servicer.batches for i in batch]
    assert "kept" in sent and "gone" not in sent
    assert servicer.released == []


def test_an_id_reserved_after_its_caller_went_away_is_given_back_and_one_whose_caller_timed_out_is_kept(
    monkeypatch,
):
    """Three callers share a call whose answer comes late. The one that went away meanwhile (its stream
    is gone) has its id released instead of refusing retries for the TTL; the one whose deadline passed
    keeps it: its stream goes on unreserved, as after a call of its own past its deadline, and the
    reservation is that stream's."""
    from data_plane.server import control_plane_client

    monkeypatch.setattr(control_plane_client, "AUTHORIZE_TIMEOUT_S", 1.0)

    async def scenario():
        servicer = _Gated(delay_s=0.6)
        async with _loopback(servicer) as client:
            blockers = await _occupy_every_call(client, servicer)
            timed_out = asyncio.ensure_future(client.reserve_request_id("t1", "timed-out", "w1", 60_000))
            gone = asyncio.ensure_future(client.reserve_request_id("t1", "gone", "w1", 60_000))
            await asyncio.sleep(0.5)
            late = asyncio.ensure_future(client.reserve_request_id("t1", "late", "w1", 60_000))
            await asyncio.sleep(0.05)
            servicer.release.set()  # the three go in one call at ~0.55 s, answered at ~1.15 s
            await blockers
            await asyncio.sleep(0.25)
            gone.cancel()
            answers = await asyncio.gather(timed_out, late, return_exceptions=True)
            for _ in range(100):
                if servicer.released:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)
        return servicer, answers

    servicer, (timed_out, late) = asyncio.run(scenario())
    assert ["timed-out", "gone", "late"] in servicer.batches
    assert isinstance(timed_out, ControlPlaneError) and timed_out.code == grpc.StatusCode.UNAVAILABLE
    assert late is None
    assert servicer.released == ["gone"]


def test_a_renewal_whose_caller_went_away_keeps_what_it_got():
    """A renewal's stream holds the id (its usage may still wait in the spool): a renewal answered after
    its caller was cancelled is not released."""

    async def scenario():
        servicer = _Gated(delay_s=0.3)
        async with _loopback(servicer) as client:
            renewal = asyncio.ensure_future(
                client.reserve_request_id("t1", "renewed", "w1", 60_000, renewal=True)
            )
            first = asyncio.ensure_future(client.reserve_request_id("t1", "first-gone", "w1", 60_000))
            await asyncio.sleep(0.1)
            renewal.cancel()
            first.cancel()
            await asyncio.sleep(0.5)
        return servicer

    servicer = asyncio.run(scenario())
    assert sorted(i for batch in servicer.batches for i in batch) == ["first-gone", "renewed"]
    assert servicer.released == ["first-gone"]
