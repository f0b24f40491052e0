"""WorkerService: registration, heartbeats, authorisation of callers' keys for adapters, artifact fetch."""

from __future__ import annotations

import dataclasses

import grpc
import pytest

from openlora.artifact import ArtifactDigest, digest_dir
from openlora.v1 import admin_pb2, worker_pb2

from .conftest import register_worker

BASE = "tiny-llama"


def _code(excinfo: pytest.ExceptionInfo) -> grpc.StatusCode:
    return excinfo.value.code()


@pytest.fixture(scope="module")
def world(cp, adapters_root) -> dict[str, str]:
    """Tenants owner and user; owner has a private and a public adapter; keys for both."""
    with cp.admin() as admin:
        admin.create_tenant("owner")
        admin.create_tenant("user")
        owner_admin = admin.create_api_key("owner", admin=True).secret
        user_key = admin.create_api_key("user").secret
        owner_key = admin.create_api_key("owner").secret
    with cp.admin(owner_admin) as owner:
        owner.upload_adapter(adapters_root / "a", name="private-one", base_model=BASE)
        owner.upload_adapter(adapters_root / "b", name="public-one", base_model=BASE, public=True)
    return {"owner_admin": owner_admin, "user": user_key, "owner": owner_key}


def _authorize(cp, api_key: str, adapters: list[str], base_model: str = BASE) -> worker_pb2.AuthorizeResponse:
    return cp.worker_stub().Authorize(
        worker_pb2.AuthorizeRequest(api_key=api_key, adapters=adapters, base_model=base_model),
        metadata=cp.worker_metadata(),
    )


def test_register_heartbeat_and_list_workers(cp, base_spec) -> None:
    registered = register_worker(cp, base_spec, address="10.0.0.7:7000")
    assert registered.worker_id and registered.heartbeat_interval_ms > 0
    again = register_worker(cp, base_spec, worker_id=registered.worker_id, address="10.0.0.7:7001")
    assert again.worker_id == registered.worker_id
    cp.worker_stub().Heartbeat(
        worker_pb2.HeartbeatRequest(
            worker_id=registered.worker_id,
            running_requests=3,
            waiting_requests=1,
            resident_adapter_sha256=["a" * 64],
        ),
        metadata=cp.worker_metadata(),
    )
    with cp.admin() as admin:
        worker = {w.id: w for w in admin.list_workers()}[registered.worker_id]
    assert (worker.address, worker.base_model, worker.running_requests, worker.resident_adapters) == (
        "10.0.0.7:7001",
        BASE,
        3,
        1,
    )


def test_heartbeat_of_unknown_worker_is_not_found(cp) -> None:
    with pytest.raises(grpc.RpcError) as e:
        cp.worker_stub().Heartbeat(
            worker_pb2.HeartbeatRequest(worker_id="ghost"), metadata=cp.worker_metadata()
        )
    assert _code(e) == grpc.StatusCode.NOT_FOUND


def test_register_with_a_wrong_fingerprint_is_invalid(cp, base_spec) -> None:
    request = worker_pb2.RegisterWorkerRequest(address="x:1")
    request.base_model.CopyFrom(
        worker_pb2.BaseModelSpec(
            **{**{f.name: getattr(base_spec, f.name) for f in dataclasses.fields(base_spec)}}
        )
    )
    request.base_model.fingerprint = "0" * 64
    with pytest.raises(grpc.RpcError) as e:
        cp.worker_stub().RegisterWorker(request, metadata=cp.worker_metadata())
    assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT and "fingerprint" in e.value.details()


def test_wrong_worker_token_is_unauthenticated(cp, world) -> None:
    for metadata in (cp.worker_metadata("not-the-token"), ()):
        with pytest.raises(grpc.RpcError) as e:
            cp.worker_stub().Authorize(worker_pb2.AuthorizeRequest(api_key=world["user"]), metadata=metadata)
        assert _code(e) == grpc.StatusCode.UNAUTHENTICATED


def test_authorize_resolves_own_and_public_adapters(cp, world, adapters_root) -> None:
    own = _authorize(cp, world["owner"], ["private-one", "public-one"])
    assert own.tenant == "owner" and own.scopes == [admin_pb2.SCOPE_INFER]
    assert [a.name for a in own.adapters] == ["private-one", "public-one"]
    assert own.adapters[0].sha256 == digest_dir(adapters_root / "a")
    assert (own.adapters[0].rank, own.adapters[0].alpha) == (8, 16.0)
    assert 0 < own.cache_ttl_ms <= 10_000
    other = _authorize(cp, world["user"], ["public-one"])
    assert other.tenant == "user" and other.adapters[0].sha256 == own.adapters[1].sha256
    assert list(_authorize(cp, world["user"], []).adapters) == []


def test_authorize_hides_another_tenants_private_adapter(cp, world) -> None:
    with pytest.raises(grpc.RpcError) as e:
        _authorize(cp, world["user"], ["private-one"])
    assert _code(e) == grpc.StatusCode.NOT_FOUND


def test_deleted_adapter_is_never_authorized(cp, world, adapters_root) -> None:
    with cp.admin(world["owner_admin"]) as owner:
        owner.upload_adapter(adapters_root / "a", name="short-lived", base_model=BASE, public=True)
        assert _authorize(cp, world["user"], ["short-lived"]).adapters[0].name == "short-lived"
        owner.delete_adapter("short-lived")
    for key in (world["user"], world["owner"]):
        with pytest.raises(grpc.RpcError) as e:
            _authorize(cp, key, ["short-lived"])
        assert _code(e) == grpc.StatusCode.NOT_FOUND


def test_a_deleted_own_name_never_falls_through_to_another_tenants_public_adapter(cp, world, adapters_root):
    """user had its own "summary"; owner publishes a public "summary" (other weights, maybe a royalty).
    After user deletes its own, its calls by that name went to owner's adapter without a word."""
    with cp.admin() as admin:
        admin.create_tenant("squatted")
        user_admin = admin.create_api_key("squatted", admin=True).secret
        user_key = admin.create_api_key("squatted").secret
    with cp.admin(user_admin) as user:
        own = user.upload_adapter(adapters_root / "a", name="summary", base_model=BASE).adapter
    with cp.admin(world["owner_admin"]) as owner:
        public = owner.upload_adapter(
            adapters_root / "b", name="summary", base_model=BASE, public=True
        ).adapter
    assert _authorize(cp, user_key, ["summary"]).adapters[0].adapter_id == own.id
    with cp.admin(user_admin) as user:
        user.delete_adapter("summary")
        with pytest.raises(grpc.RpcError) as e:
            user.get_adapter("summary")
        assert _code(e) == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        _authorize(cp, user_key, ["summary"])
    assert _code(e) == grpc.StatusCode.NOT_FOUND
    assert _authorize(cp, world["user"], ["summary"]).adapters[0].adapter_id == public.id  # never had one
    with cp.admin(user_admin) as user:
        user.upload_adapter(adapters_root / "a", name="summary", base_model=BASE)
    assert _authorize(cp, user_key, ["summary"]).adapters[0].adapter_id == own.id


def test_revoked_or_unknown_key_is_unauthenticated(cp, world) -> None:
    with cp.admin() as admin:
        created = admin.create_api_key("user")
        assert _authorize(cp, created.secret, []).tenant == "user"
        admin.revoke_api_key(created.key.id)
    for key in (created.secret, "olk_0123456789ab_abcdefghijklmnopqrstuvwxyz", "junk"):
        with pytest.raises(grpc.RpcError) as e:
            _authorize(cp, key, [])
        assert _code(e) == grpc.StatusCode.UNAUTHENTICATED


def test_adapter_for_another_base_model_is_refused(cp, world) -> None:
    from openlora.base_model import BaseModelSpec

    from .conftest import tiny_llama_dict

    other = BaseModelSpec.from_hf_config({**tiny_llama_dict(), "hidden_size": 128}, "wider-llama")
    register_worker(cp, other, worker_id="wide-worker")
    with pytest.raises(grpc.RpcError) as e:
        _authorize(cp, world["owner"], ["private-one"], base_model="wider-llama")
    assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION and "adapter" in e.value.details()


def test_a_checkpoint_of_other_dimensions_is_refused_the_name_live_workers_serve(cp, adapters_root) -> None:
    """A worker of another checkpoint registering under the name live workers serve (two model directories
    both called `model`) took the name's dimensions: every adapter of the name was then refused on the
    live workers (FAILED_PRECONDITION 'made for base model X, not for X'). It is refused instead, naming
    the field; once no worker of the old dimensions is live, the name takes the new ones."""
    import uuid

    import psycopg

    from openlora.base_model import BaseModelSpec

    from .conftest import tiny_llama_dict

    name = f"shared-{uuid.uuid4().hex[:8]}"
    first, second = f"{name}-first", f"{name}-second"
    register_worker(cp, BaseModelSpec.from_hf_config(tiny_llama_dict(), name), worker_id=first)
    with cp.admin() as admin:
        admin.create_tenant(name)
        key = admin.create_api_key(name, admin=True).secret
    with cp.admin(key) as tenant:
        tenant.upload_adapter(adapters_root / "a", name="served", base_model=name)
    deeper = BaseModelSpec.from_hf_config(tiny_llama_dict(num_layers=3), name)
    with pytest.raises(grpc.RpcError) as e:
        register_worker(cp, deeper, worker_id=second)
    assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION
    assert "base_model.name" in e.value.details() and first in e.value.details()
    assert _authorize(cp, key, ["served"], base_model=name).adapters[0].name == "served"
    # The first worker is gone (no heartbeat for a day): the name is the new checkpoint's.
    with psycopg.connect(cp.config.database_url) as conn:
        conn.execute("UPDATE worker SET last_heartbeat_at = now() - interval '1 day' WHERE id = %s", (first,))
    assert register_worker(cp, deeper, worker_id=second).worker_id == second
    with pytest.raises(grpc.RpcError) as e:
        _authorize(cp, key, ["served"], base_model=name)
    assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION


def _age(cp, worker_id: str) -> None:
    """The worker's last heartbeat a day ago: it looks dead (cut off, or crashed)."""
    import psycopg

    with psycopg.connect(cp.config.database_url) as conn:
        conn.execute(
            "UPDATE worker SET last_heartbeat_at = now() - interval '1 day' WHERE id = %s", (worker_id,)
        )


def _heartbeat(cp, worker_id: str, instance_id: str) -> None:
    cp.worker_stub().Heartbeat(
        worker_pb2.HeartbeatRequest(worker_id=worker_id, instance_id=instance_id),
        metadata=cp.worker_metadata(),
    )


def _deregister(cp, worker_id: str, instance_id: str) -> None:
    cp.worker_stub().DeregisterWorker(
        worker_pb2.DeregisterWorkerRequest(worker_id=worker_id, instance_id=instance_id),
        metadata=cp.worker_metadata(),
    )


def _listed(cp, worker_id: str) -> admin_pb2.Worker:
    with cp.admin() as admin:
        return {w.id: w for w in admin.list_workers()}[worker_id]


def test_a_heartbeat_from_an_instance_that_no_longer_holds_its_id_is_refused(cp, base_spec) -> None:
    """A worker cut off from the control plane past three heartbeat intervals, whose id another process
    registered meanwhile, went on heartbeating under it when it came back, and was taken: two processes
    counted as one live worker. Its heartbeats are refused (FAILED_PRECONDITION naming the instance and
    the id); the holder's are taken."""
    import uuid

    worker_id = f"cut-off-{uuid.uuid4().hex[:8]}"
    register_worker(cp, base_spec, worker_id=worker_id, address="10.0.0.1:1", instance_id="first-run")
    _heartbeat(cp, worker_id, "first-run")
    _age(cp, worker_id)
    register_worker(cp, base_spec, worker_id=worker_id, address="10.0.0.2:2", instance_id="other-process")
    for stale in ("first-run", ""):  # an instance-less beat cannot show it is the holder either
        with pytest.raises(grpc.RpcError) as e:
            _heartbeat(cp, worker_id, stale)
        assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION
        details = e.value.details()
        assert details.startswith("instance_id: ") and repr(worker_id) in details and repr(stale) in details
        assert "'other-process' at 10.0.0.2:2" in details
    _heartbeat(cp, worker_id, "other-process")
    assert _listed(cp, worker_id).address == "10.0.0.2:2"


def test_a_worker_that_names_no_instance_keeps_heartbeating(cp, base_spec) -> None:
    """A worker of an earlier version (no instance in its registration or heartbeats) is taken as before;
    once a worker naming an instance registered its id, its instance-less beats are refused."""
    import uuid

    worker_id = f"unnamed-{uuid.uuid4().hex[:8]}"
    register_worker(cp, base_spec, worker_id=worker_id)
    _heartbeat(cp, worker_id, "")
    with pytest.raises(grpc.RpcError) as e:
        _heartbeat(cp, worker_id, "a-guess")
    assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION
    assert "a worker that names no instance" in e.value.details()


def test_list_workers_says_which_are_live_by_the_heartbeat_rule(cp, base_spec) -> None:
    """ListWorkers listed a worker dead for a day like a live one. Each entry says whether it counts as
    live (the rule that bounds ranks and holds ids and base models) and how old its heartbeat is."""
    import uuid

    worker_id = f"listed-{uuid.uuid4().hex[:8]}"
    register_worker(cp, base_spec, worker_id=worker_id)
    listed = _listed(cp, worker_id)
    assert listed.live and listed.heartbeat_age_s >= 0 and not listed.HasField("left_at")
    _age(cp, worker_id)
    listed = _listed(cp, worker_id)
    assert not listed.live and listed.heartbeat_age_s >= 23 * 3600 and not listed.HasField("left_at")
    _heartbeat(cp, worker_id, "")
    assert _listed(cp, worker_id).live


def test_a_worker_that_leaves_stops_counting_as_live_at_once(cp, base_spec) -> None:
    """A worker that stopped cleanly counted as live for three heartbeat intervals: its rank limit bounded
    uploads and mixes, its base model's dimensions held the name, its id was refused to others. It says
    it leaves (only its own instance may), and none of that holds from then on."""
    import uuid

    from control_plane.workers.service import max_lora_rank
    from openlora.base_model import BaseModelSpec

    from .conftest import tiny_llama_dict

    name = f"leaving-{uuid.uuid4().hex[:8]}"
    worker_id = f"{name}-worker"
    spec = BaseModelSpec.from_hf_config(tiny_llama_dict(), name)
    register_worker(cp, spec, worker_id=worker_id, max_lora_rank=256, instance_id="run")
    with cp.running.app.sessions.begin() as s:
        assert max_lora_rank(s, name, 60.0) == 256
    for instance_id, code in (
        ("", grpc.StatusCode.INVALID_ARGUMENT),
        ("another-run", grpc.StatusCode.FAILED_PRECONDITION),
    ):
        with pytest.raises(grpc.RpcError) as e:
            _deregister(cp, worker_id, instance_id)
        assert _code(e) == code and e.value.details().startswith("instance_id: ")
    with pytest.raises(grpc.RpcError) as e:
        _deregister(cp, "nobody", "run")
    assert _code(e) == grpc.StatusCode.NOT_FOUND
    assert _listed(cp, worker_id).live
    _deregister(cp, worker_id, "run")
    _deregister(cp, worker_id, "run")  # a retry after a lost answer
    listed = _listed(cp, worker_id)
    assert not listed.live and listed.HasField("left_at")
    with cp.running.app.sessions.begin() as s:
        assert max_lora_rank(s, name, 60.0) is None
    with pytest.raises(grpc.RpcError) as e:
        _heartbeat(cp, worker_id, "run")
    assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION and "left" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:  # a registration it had in flight as it stopped, arriving late
        register_worker(cp, spec, worker_id=worker_id, max_lora_rank=256, instance_id="run")
    assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION and "left" in e.value.details()
    assert not _listed(cp, worker_id).live
    deeper = BaseModelSpec.from_hf_config(tiny_llama_dict(num_layers=3), name)
    register_worker(cp, deeper, worker_id=f"{name}-deeper", instance_id="deeper-run")
    register_worker(cp, deeper, worker_id=worker_id, instance_id="next-process")
    listed = _listed(cp, worker_id)
    assert listed.live and not listed.HasField("left_at")


def test_fetch_artifact_streams_files_that_digest_to_their_address(cp, world, adapters_root) -> None:
    sha256 = _authorize(cp, world["owner"], ["private-one"]).adapters[0].sha256
    files: dict[str, bytearray] = {}
    sizes: dict[str, int] = {}
    current = ""
    for message in cp.worker_stub().FetchArtifact(
        worker_pb2.FetchArtifactRequest(sha256=sha256), metadata=cp.worker_metadata()
    ):
        assert len(message.data) <= 1 << 20
        if message.filename:
            current = message.filename
            files[current] = bytearray()
            sizes[current] = message.file_size_bytes
        assert message.offset == len(files[current])
        files[current] += message.data
    assert sorted(files) == ["adapter_config.json", "adapter_model.safetensors"]
    digest = ArtifactDigest()
    for name in sorted(files):
        assert len(files[name]) == sizes[name]
        digest.begin_file(name, len(files[name]))
        digest.update(bytes(files[name]))
    assert digest.hexdigest() == sha256 == digest_dir(adapters_root / "a")


def test_fetch_unknown_or_malformed_artifact(cp) -> None:
    for sha256, code in (("f" * 64, grpc.StatusCode.NOT_FOUND), ("../etc", grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.RpcError) as e:
            list(
                cp.worker_stub().FetchArtifact(
                    worker_pb2.FetchArtifactRequest(sha256=sha256), metadata=cp.worker_metadata()
                )
            )
        assert _code(e) == code


def _check_request_id(cp, tenant_id: str, request_id: str, token: str | None = None):
    metadata = cp.worker_metadata() if token is None else cp.worker_metadata(token)
    return cp.worker_stub().CheckRequestId(
        worker_pb2.CheckRequestIdRequest(tenant_id=tenant_id, request_id=request_id), metadata=metadata
    )


def test_request_id_with_recorded_usage_is_already_exists_for_its_tenant_only(cp, world) -> None:
    user = _authorize(cp, world["user"], []).tenant_id
    owner = _authorize(cp, world["owner"], []).tenant_id
    request_id = "check-me-once"
    _check_request_id(cp, user, request_id)  # unused: answers OK
    event = worker_pb2.UsageEvent(
        request_id=request_id, tenant_id=user, base_model=BASE, prompt_tokens=1, completion_tokens=1
    )
    reported = cp.worker_stub().ReportUsage(
        worker_pb2.ReportUsageRequest(events=[event]), metadata=cp.worker_metadata()
    )
    assert reported.inserted == 1
    with pytest.raises(grpc.RpcError) as e:
        _check_request_id(cp, user, request_id)
    assert _code(e) == grpc.StatusCode.ALREADY_EXISTS and "request_id" in e.value.details()
    _check_request_id(cp, owner, request_id)  # another tenant's id space


def test_check_request_id_refuses_bad_input_and_foreign_callers(cp, world) -> None:
    user = _authorize(cp, world["user"], []).tenant_id
    for tenant_id, request_id, field in (("not-a-uuid", "r", "tenant_id"), (user, "", "request_id")):
        with pytest.raises(grpc.RpcError) as e:
            _check_request_id(cp, tenant_id, request_id)
        assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT and field in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        _check_request_id(cp, user, "x" * 129)
    assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as e:
        _check_request_id(cp, user, "r", token="not-the-worker-token")
    assert _code(e) == grpc.StatusCode.UNAUTHENTICATED


def test_a_dead_worker_does_not_count_as_live_for_as_long_as_the_control_planes_clock_stepped_back(
    cp, base_spec, monkeypatch
) -> None:
    """A heartbeat stamped before the control plane's clock stepped back an hour lay an hour in its future:
    a worker that died just then counted as live for that hour (its id refused to a new process, its rank
    limit held). A heartbeat stamped past the live window's end no longer counts; the worker's next one,
    stamped by the clock as it is now, does."""
    import uuid
    from datetime import timedelta

    from control_plane.db.base import utc_now

    worker_id = f"stepped-{uuid.uuid4().hex[:8]}"
    register_worker(cp, base_spec, worker_id=worker_id, address="10.0.0.3:3", instance_id="died")
    assert _listed(cp, worker_id).live
    monkeypatch.setattr("control_plane.workers.service.utc_now", lambda: utc_now() - timedelta(hours=1))
    assert not _listed(cp, worker_id).live
    register_worker(cp, base_spec, worker_id=worker_id, address="10.0.0.4:4", instance_id="replacement")
    _heartbeat(cp, worker_id, "replacement")
    listed = _listed(cp, worker_id)
    assert listed.live and listed.address == "10.0.0.4:4"
