"""The worker's control-plane client when the control plane cannot be reached."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import grpc

from data_plane.server.control_plane_client import ControlPlaneClient, ControlPlaneError


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_control_plane_is_unavailable_to_the_caller():
    async def scenario():
        client = ControlPlaneClient(f"127.0.0.1:{_closed_port()}", "token")
        try:
            await client.authorize("olk_key", ("a",), "tiny")
        except ControlPlaneError as error:
            return error
        finally:
            await client.close()

    error = asyncio.run(scenario())
    assert isinstance(error, ControlPlaneError)
    assert error.code == grpc.StatusCode.UNAVAILABLE


class _HangingControlPlane:
    """A real WorkerService on loopback whose Authorize answers (cache TTL 50 ms) until `hang` is set,
    then never answers: a control plane whose process or database froze."""

    def __init__(self) -> None:
        from openlora.v1 import admin_pb2, worker_pb2, worker_pb2_grpc

        self.hang = asyncio.Event()
        self.calls = 0
        owner = self

        class Servicer(worker_pb2_grpc.WorkerServiceServicer):
            async def Authorize(self, request, context):
                owner.calls += 1
                if owner.hang.is_set():
                    await asyncio.Event().wait()
                return worker_pb2.AuthorizeResponse(
                    tenant_id="t1", tenant="t", scopes=[admin_pb2.SCOPE_INFER], cache_ttl_ms=50
                )

        self.server = grpc.aio.server()
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(Servicer(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")


@contextlib.asynccontextmanager
async def _loopback(servicer):
    """A ControlPlaneClient of a WorkerService `servicer` served on loopback."""
    from openlora.v1 import worker_pb2_grpc

    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = ControlPlaneClient(f"127.0.0.1:{port}", "token")
    try:
        yield client
    finally:
        await client.close()
        await server.stop(None)


async def _chunks_of(fetch) -> list:
    return [chunk async for chunk in fetch]


def test_an_artifact_fetch_the_control_plane_stops_sending_is_unavailable_within_the_stall_bound(monkeypatch):
    """A control plane that froze in the middle of FetchArtifact (SIGSTOP, a hung disk) held the fetch,
    and with it every first call of that adapter, for the whole 300 s deadline; now a fetch that gets no
    chunk for FETCH_STALL_S ends UNAVAILABLE (retry), while one that keeps sending is never cut."""
    from data_plane.server import control_plane_client
    from openlora.v1 import worker_pb2, worker_pb2_grpc

    monkeypatch.setattr(control_plane_client, "FETCH_STALL_S", 0.5, raising=False)

    class Servicer(worker_pb2_grpc.WorkerServiceServicer):
        async def FetchArtifact(self, request, context):
            for offset in range(0, 8, 2):  # a chunk every 0.3 s: slow, never stalled
                yield worker_pb2.FetchArtifactResponse(
                    filename="a", offset=offset, data=b"xx", file_size_bytes=8
                )
                await asyncio.sleep(0.3)
            if request.sha256 == "stalls":
                await asyncio.Event().wait()

    async def fetch(client, sha256):
        started = asyncio.get_running_loop().time()
        try:
            chunks = await asyncio.wait_for(_chunks_of(client.fetch_artifact(sha256)), 10)
            return len(chunks), None, 0.0
        except ControlPlaneError as error:
            return None, error, asyncio.get_running_loop().time() - started
        except TimeoutError:
            return None, None, 10.0  # still waiting

    async def scenario():
        async with _loopback(Servicer()) as client:
            return await fetch(client, "slow"), await fetch(client, "stalls")

    (num_chunks, _, _), (_, error, waited_s) = asyncio.run(scenario())
    assert num_chunks == 4
    assert error is not None and error.code == grpc.StatusCode.UNAVAILABLE, error
    assert "FetchArtifact" in error.message
    assert waited_s < 5


def test_a_hung_control_plane_costs_one_timeout_then_cached_keys_answer_at_once(monkeypatch):
    """Frozen control plane (or database): each call with a cached key waited out the 5 s Authorize
    timeout again, for up to the 10 minute grace. Now one call waits; while that Authorize got no answer
    the next calls get the key's last answer at once, and one Authorize per key asks again beside them."""
    from data_plane.server import control_plane_client

    monkeypatch.setattr(control_plane_client, "AUTHORIZE_TIMEOUT_S", 0.5)

    async def scenario():
        cp = _HangingControlPlane()
        await cp.server.start()
        client = ControlPlaneClient(f"127.0.0.1:{cp.port}", "token")
        try:
            first = await client.authorize("olk_key", (), "tiny")
            cp.hang.set()
            await asyncio.sleep(0.1)  # past the answer's TTL
            waited = await client.authorize("olk_key", (), "tiny")
            assert client.outage_answers == 1  # served after its Authorize timed out
            calls = cp.calls
            answers = [await client.authorize("olk_key", (), "tiny") for _ in range(5)]
            await asyncio.sleep(0.1)  # the background Authorize reaches the server, well within its timeout
            in_flight = bool(client._asking)
            return first, waited, answers, client.outage_answers, cp.calls - calls, in_flight
        finally:
            await client.close()
            await cp.server.stop(0)

    first, waited, answers, outage_answers, new_calls, in_flight = asyncio.run(scenario())
    assert waited == first and all(answer == first for answer in answers)
    assert outage_answers == 6
    assert new_calls == 1 and in_flight  # five calls answered at once, one Authorize asking beside them


class _TenantsControlPlane:
    """A real WorkerService on loopback answering every Authorize for the tenant the key names
    ("key-<tenant>"), resolving each name to an adapter; `down` makes it UNAVAILABLE."""

    def __init__(self) -> None:
        from openlora.v1 import admin_pb2, worker_pb2, worker_pb2_grpc

        self.down = False
        owner = self

        class Servicer(worker_pb2_grpc.WorkerServiceServicer):
            async def Authorize(self, request, context):
                if owner.down:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "down")
                tenant = request.api_key.removeprefix("key-")
                return worker_pb2.AuthorizeResponse(
                    tenant_id=tenant,
                    tenant=tenant,
                    scopes=[admin_pb2.SCOPE_INFER],
                    adapters=[
                        worker_pb2.ResolvedAdapter(name=n, adapter_id=f"id-{n}", sha256="0" * 64, rank=8)
                        for n in request.adapters
                    ],
                    cache_ttl_ms=60_000,
                )

        self.server = grpc.aio.server()
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(Servicer(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")


def test_one_tenants_flood_of_name_lists_does_not_push_out_other_tenants_answers():
    """Thousands of distinct name lists from one tenant pushed every other tenant's cached answer out, and
    with it their service through a control-plane outage; each NOT_FOUND then scanned the whole cache.
    A tenant's answers now take at most its share of the entries (its oldest leave first), and forgetting
    one key's names touches only that key's answers."""

    async def scenario():
        cp = _TenantsControlPlane()
        await cp.server.start()
        client = ControlPlaneClient(f"127.0.0.1:{cp.port}", "token", auth_cache_max_entries=320)
        try:
            victim = await client.authorize("key-victim", ("mine",), "tiny")
            for i in range(400):  # past the whole cache's 320 entries
                await client.authorize("key-flood", (f"n{i}",), "tiny")
            cp.down = True
            during_outage = await client.authorize("key-victim", ("mine",), "tiny")
            assert client.forget_names("key-flood", ("mine",)) == 0  # another key's names: untouched
            flood_held = len(client._keys_of_api_key["key-flood"])
            return victim, during_outage, flood_held
        finally:
            await client.close()
            await cp.server.stop(0)

    victim, during_outage, flood_held = asyncio.run(scenario())
    assert during_outage == victim  # still cached: served through the outage
    assert flood_held == 20  # 320 / 16


def test_the_caches_indexes_stay_within_twice_its_entries():
    """Answers the cache drops on its own (evicted by many tenants' calls) left their index entries for
    the life of the process; a sweep keeps the indexes within twice the cache."""

    async def scenario():
        cp = _TenantsControlPlane()
        await cp.server.start()
        client = ControlPlaneClient(f"127.0.0.1:{cp.port}", "token", auth_cache_max_entries=320)
        try:
            sizes = []
            for tenant in range(50):  # 50 tenants x 20 answers: 1,000 stored into 320 entries
                for i in range(20):
                    await client.authorize(f"key-t{tenant}", (f"n{i}",), "tiny")
                sizes.append(len(client._tenant_of_key))
            return sizes, client.num_cached_answers
        finally:
            await client.close()
            await cp.server.stop(0)

    sizes, cached = asyncio.run(scenario())
    assert cached == 320
    assert max(sizes) <= 2 * 320


def test_one_keys_authorize_calls_are_bounded_and_never_delay_another_keys(monkeypatch):
    """Calls naming adapters nobody resolved are never cached, so a tenant's 400 loops of them kept 400
    Authorize calls at the control plane and every other tenant's first tokens waited seconds. One key has
    at most MAX_AUTHORIZE_IN_FLIGHT_PER_KEY calls there; its others wait for a turn (RESOURCE_EXHAUSTED past
    AUTHORIZE_TIMEOUT_S), and another key's call goes straight through meanwhile."""
    from data_plane.server import control_plane_client
    from data_plane.server.control_plane_client import MAX_AUTHORIZE_IN_FLIGHT_PER_KEY
    from openlora.v1 import worker_pb2, worker_pb2_grpc

    monkeypatch.setattr(control_plane_client, "AUTHORIZE_TIMEOUT_S", 3.0)
    in_flight: dict[str, int] = {}
    most: dict[str, int] = {}

    class Servicer(worker_pb2_grpc.WorkerServiceServicer):
        def __init__(self, release: asyncio.Event) -> None:
            self.release = release

        async def Authorize(self, request, context):
            key = request.api_key
            in_flight[key] = in_flight.get(key, 0) + 1
            most[key] = max(most.get(key, 0), in_flight[key])
            try:
                if key == "flooder":
                    await self.release.wait()
                return worker_pb2.AuthorizeResponse(
                    tenant_id="t-" + key,
                    tenant=key,
                    adapters=[worker_pb2.ResolvedAdapter(name=name) for name in request.adapters],
                )
            finally:
                in_flight[key] -= 1

    async def scenario():
        release = asyncio.Event()
        async with _loopback(Servicer(release)) as client:
            flood = [
                asyncio.ensure_future(client.authorize("flooder", (f"nx{i}",), "base")) for i in range(40)
            ]
            while in_flight.get("flooder", 0) < MAX_AUTHORIZE_IN_FLIGHT_PER_KEY:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)  # the rest wait for a turn, not at the control plane
            other = await asyncio.wait_for(client.authorize("other", ("mine",), "base"), 2)
            waiting_while_other_answered = sum(not call.done() for call in flood)
            release.set()
            answers = await asyncio.gather(*flood)
            return other, waiting_while_other_answered, answers

    other, waiting, answers = asyncio.run(scenario())
    assert most["flooder"] == MAX_AUTHORIZE_IN_FLIGHT_PER_KEY
    assert other.tenant == "other" and waiting == 40  # answered while all 40 of the flood waited
    assert [a.adapters[0].name for a in answers] == [f"nx{i}" for i in range(40)]


def test_a_key_whose_authorize_calls_wait_too_long_for_a_turn_is_resource_exhausted(monkeypatch):
    from data_plane.server import control_plane_client
    from openlora.v1 import worker_pb2_grpc

    monkeypatch.setattr(control_plane_client, "AUTHORIZE_TIMEOUT_S", 0.5)
    monkeypatch.setattr(control_plane_client, "MAX_AUTHORIZE_IN_FLIGHT_PER_KEY", 1)

    class Servicer(worker_pb2_grpc.WorkerServiceServicer):
        async def Authorize(self, request, context):
            await asyncio.Event().wait()  # never answers: each call ends at its deadline

    async def scenario():
        async with _loopback(Servicer()) as client:
            calls = [client.authorize("flooder", (f"nx{i}",), "base") for i in range(3)]
            return await asyncio.gather(*calls, return_exceptions=True)

    outcomes = asyncio.run(scenario())
    codes = sorted(error.code.name for error in outcomes if isinstance(error, ControlPlaneError))
    assert "RESOURCE_EXHAUSTED" in codes and len(codes) == 3, outcomes


def test_a_control_plane_without_an_rpc_is_said_to_be_older_not_unavailable():
    """A control plane of an older version (no DeregisterWorker): the worker's warning said "control plane
    unavailable ...; retry shortly", which no retry mends."""
    import asyncio

    import grpc as grpc_module

    from data_plane.server.control_plane_client import ControlPlaneClient, ControlPlaneError

    async def main() -> ControlPlaneError:
        server = grpc_module.aio.server()  # serves no method at all: every call is UNIMPLEMENTED
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        client = ControlPlaneClient(f"127.0.0.1:{port}", "token")
        try:
            await client.deregister("w", "0" * 32)
        except ControlPlaneError as error:
            return error
        finally:
            await client.close()
            await server.stop(0)
        raise AssertionError("the call was answered")

    error = asyncio.run(main())
    assert "does not implement DeregisterWorker (an older version)" in error.message
    assert "retry" not in error.message


def test_a_flood_of_unknown_keys_holds_a_bounded_number_of_authorize_calls_and_never_delays_a_known_key(
    monkeypatch,
):
    """Random keys are each their own key, so the per-key bound did not apply: 60 of them kept 60
    Authorize calls (a database query each) at the control plane. Keys with no recent answer share
    MAX_UNKNOWN_KEY_AUTHORIZE_IN_FLIGHT calls there; a key answered before goes straight through meanwhile."""
    from data_plane.server import control_plane_client
    from data_plane.server.control_plane_client import MAX_UNKNOWN_KEY_AUTHORIZE_IN_FLIGHT
    from openlora.v1 import worker_pb2, worker_pb2_grpc

    monkeypatch.setattr(control_plane_client, "AUTHORIZE_TIMEOUT_S", 3.0)
    in_flight = {"strangers": 0, "known": 0}
    most = {"strangers": 0, "known": 0}

    class Servicer(worker_pb2_grpc.WorkerServiceServicer):
        def __init__(self, release: asyncio.Event) -> None:
            self.release = release

        async def Authorize(self, request, context):
            who = "known" if request.api_key == "known" else "strangers"
            in_flight[who] += 1
            most[who] = max(most[who], in_flight[who])
            try:
                if who == "strangers":
                    await self.release.wait()
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown or revoked api key")
                return worker_pb2.AuthorizeResponse(
                    tenant_id="t-known", tenant="known", cache_ttl_ms=1,
                    adapters=[worker_pb2.ResolvedAdapter(name=name) for name in request.adapters],
                )  # fmt: skip
            finally:
                in_flight[who] -= 1

    async def scenario():
        release = asyncio.Event()
        async with _loopback(Servicer(release)) as client:
            await client.authorize("known", ("mine",), "base")  # answered once: a known key
            await asyncio.sleep(0.01)  # its 1 ms answer is stale: the next call asks again
            flood = [
                asyncio.ensure_future(client.authorize(f"olk_random{i}", ("x",), "base")) for i in range(60)
            ]
            while in_flight["strangers"] < MAX_UNKNOWN_KEY_AUTHORIZE_IN_FLIGHT:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)  # the rest wait for a turn, not at the control plane
            known = await asyncio.wait_for(client.authorize("known", ("mine",), "base"), 2)
            waiting = sum(not call.done() for call in flood)
            release.set()
            outcomes = await asyncio.gather(*flood, return_exceptions=True)
            return known, waiting, outcomes

    known, waiting, outcomes = asyncio.run(scenario())
    assert most["strangers"] == MAX_UNKNOWN_KEY_AUTHORIZE_IN_FLIGHT
    assert known.tenant == "known" and waiting == 60  # answered while the whole flood waited
    codes = [o.code for o in outcomes if isinstance(o, ControlPlaneError)]
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 60  # every stranger's own answer, once its turn came


def test_a_refused_key_is_refused_again_without_asking_the_control_plane(monkeypatch):
    """A client repeating a bad key cost an Authorize per call; a refusal now answers the same key's next
    calls for REFUSED_KEY_TTL_S, with the control plane's own message, then the key is asked about again."""
    from data_plane.server import control_plane_client
    from openlora.v1 import worker_pb2_grpc

    asked: list[str] = []

    class Servicer(worker_pb2_grpc.WorkerServiceServicer):
        async def Authorize(self, request, context):
            asked.append(request.api_key)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown or revoked api key")

    async def calls(client, key, n):
        return [await _refusal(client.authorize(key, ("a",), "base")) for _ in range(n)]

    async def scenario():
        async with _loopback(Servicer()) as client:
            first = await calls(client, "olk_bad", 20)
            other = await calls(client, "olk_other", 1)
            expiring = 0.2
            monkeypatch.setattr(control_plane_client, "REFUSED_KEY_TTL_S", expiring)
            client._refused_keys = control_plane_client.TTLCache(
                maxsize=16, ttl=expiring, timer=control_plane_client.time.monotonic
            )
            await calls(client, "olk_bad", 1)
            await asyncio.sleep(expiring + 0.05)
            later = await calls(client, "olk_bad", 1)
            return first, other, later

    first, other, later = asyncio.run(scenario())
    assert {(e.code, e.message) for e in first} == {
        (grpc.StatusCode.UNAUTHENTICATED, "unknown or revoked api key")
    }
    assert other[0].code == grpc.StatusCode.UNAUTHENTICATED
    assert later[0].code == grpc.StatusCode.UNAUTHENTICATED
    # 20 calls of one bad key asked once; the other key asked on its own; past the TTL the key asks again
    # (once for the call that refilled the cache, once after it expired).
    assert asked == ["olk_bad", "olk_other", "olk_bad", "olk_bad"]


async def _refusal(call) -> ControlPlaneError:
    try:
        await call
    except ControlPlaneError as error:
        return error
    raise AssertionError("the call was answered")


def test_one_keys_model_listings_share_its_bound_at_the_control_plane():
    """GET /v1/models asks ListModels on every call (never cached): a tenant's loop of 30 listings kept 30
    queries at the control plane at once. They now share the key's MAX_AUTHORIZE_IN_FLIGHT_PER_KEY turns,
    and every listing is still answered in full."""
    from data_plane.server.control_plane_client import MAX_AUTHORIZE_IN_FLIGHT_PER_KEY
    from openlora.v1 import worker_pb2, worker_pb2_grpc

    in_flight, most = [0], [0]

    class Servicer(worker_pb2_grpc.WorkerServiceServicer):
        async def ListModels(self, request, context):
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
            try:
                await asyncio.sleep(0.05)
                return worker_pb2.ListModelsResponse(models=[worker_pb2.ModelEntry(name="mine")])
            finally:
                in_flight[0] -= 1

    async def scenario():
        async with _loopback(Servicer()) as client:
            return await asyncio.gather(*(client.list_models("olk_lister", "base") for _ in range(30)))

    listings = asyncio.run(scenario())
    assert most[0] == MAX_AUTHORIZE_IN_FLIGHT_PER_KEY
    assert [[m.name for m in listed] for listed in listings] == [["mine"]] * 30
