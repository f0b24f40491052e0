"""Worker registration and heartbeats, and the base models they bring."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, fields
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from control_plane.db.base import lock_until_commit, utc_now
from control_plane.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from control_plane.text import check_text
from control_plane.workers.models import BaseModelRow, Worker
from openlora.base_model import BaseModelSpec

MAX_NAME_CHARS = 128
MAX_NAMES_LISTED = 10  # base models an error names when a request leaves its base model empty
# The columns of counts and dimensions are 32-bit signed; the wire's uint32 goes up to 2**32 - 1.
MAX_COUNT = 2**31 - 1
MAX_INSTANCE_ID_CHARS = 64


@dataclass(frozen=True)
class WorkerRegistration:
    worker_id: str
    address: str
    spec: BaseModelSpec
    # The fingerprint the worker computed; must equal the one of `spec`.
    fingerprint: str
    max_lora_rank: int
    num_adapter_slots: int
    # Random per run of the worker process, and the one its state directory registered last ("": unsaid).
    instance_id: str = ""
    previous_instance_id: str = ""


def _check_spec(spec: BaseModelSpec, fingerprint: str) -> None:
    if not spec.name:
        raise InvalidArgument("required", field="base_model.name")
    check_text(spec.name, "base_model.name", MAX_NAME_CHARS)
    check_text(spec.architecture, "base_model.architecture", 64)
    for f in fields(spec):
        value = getattr(spec, f.name)
        if isinstance(value, int) and value <= 0:
            raise InvalidArgument("must be positive", field=f"base_model.{f.name}")
        if isinstance(value, int):
            _check_count(value, f"base_model.{f.name}")
    if fingerprint and fingerprint != spec.fingerprint:
        raise InvalidArgument("does not match the dimensions sent", field="base_model.fingerprint")


def _check_count(value: int, field: str) -> None:
    if value > MAX_COUNT:
        raise InvalidArgument(f"must be at most {MAX_COUNT}, got {value}", field=field)


def upsert_base_model(
    session: Session, spec: BaseModelSpec, worker_id: str = "", live_within_s: float | None = None
) -> BaseModelRow:
    """The base model row of `spec`, created, or given the new dimensions. With `live_within_s`, new
    dimensions are refused (FAILED_PRECONDITION naming base_model.name) while a live worker other than
    `worker_id` serves the name with the old ones: they would refuse every adapter of the name on that
    worker and its peers (a checkpoint of another model under the same name, such as two directories
    both called `model`)."""
    # Workers of a new base model registering at once each found no row and inserted one: all but one
    # failed on its key (INTERNAL). The lock holds a row that may not exist yet.
    lock_until_commit(session, f"base_model:{spec.name}")
    row = session.get(BaseModelRow, spec.name, with_for_update=True)
    dims = {f.name: getattr(spec, f.name) for f in fields(spec) if f.name != "name"}
    if row is None:
        row = BaseModelRow(name=spec.name, fingerprint=spec.fingerprint, **dims)
        session.add(row)
    elif row.fingerprint != spec.fingerprint:
        if live_within_s is not None:
            _check_no_live_worker_of(session, spec.name, worker_id, live_within_s)
        # Adapters validated for the old dimensions keep their old fingerprint and are refused by
        # Authorize from now on.
        for key, value in dims.items():
            setattr(row, key, value)
        row.fingerprint = spec.fingerprint
        row.updated_at = utc_now()
    session.flush()
    return row


def _live_window(live_within_s: float, now: datetime | None = None) -> tuple[datetime, datetime]:
    """The oldest and the newest heartbeat of a live worker (`Worker.is_live_within`): within
    `live_within_s` of now either way, so that a clock stepped back by less changes nothing."""
    now = now or utc_now()
    return now - timedelta(seconds=live_within_s), now + timedelta(seconds=live_within_s)


def _check_no_live_worker_of(session: Session, name: str, worker_id: str, live_within_s: float) -> None:
    live = session.scalar(
        select(Worker)
        .where(
            Worker.base_model_name == name,
            Worker.id != worker_id,
            Worker.is_live_within(*_live_window(live_within_s)),
        )
        .order_by(Worker.last_heartbeat_at.desc())
        .limit(1)
    )
    if live is not None:
        raise FailedPrecondition(
            f"base model {name!r} is served with other dimensions by live worker {live.id!r} "
            f"({live.address}); serve this checkpoint under a name of its own (--model-name), or stop "
            "the workers of the old one first",
            field="base_model.name",
        )


def _check_not_held(worker: Worker, registration: WorkerRegistration, live_window) -> None:
    """ALREADY_EXISTS naming worker_id when another process (instance) registered this id and is live:
    both would serve under one id, sharing its request id reservations (each could serve an id the
    other was serving) and its usage records (one serving merged into the other's, unbilled). The
    worker's own previous run (named by its state directory) takes the id over at once; a worker or a
    row that names no instance is not checked."""
    held_by = worker.instance_id
    if not held_by or not registration.instance_id or not worker.is_live_within(*live_window):
        return
    if held_by in (registration.instance_id, registration.previous_instance_id):
        return
    raise AlreadyExists(
        f"worker id {worker.id!r} is held by a live worker at {worker.address} (another process); give "
        "each worker its own state directory (--state-dir) and --worker-id, or stop that one first",
        field="worker_id",
    )


def register_worker(
    session: Session, registration: WorkerRegistration, live_within_s: float | None = None
) -> Worker:
    """Registers (or registers again) a worker. `live_within_s`: a worker whose last heartbeat is that
    recent, and that has not left, is live (`Worker.is_live_within`); its id is not another process's to
    take (`_check_not_held`), nor its base model's name another checkpoint's (`upsert_base_model`)."""
    _check_spec(registration.spec, registration.fingerprint)
    if not registration.address:
        raise InvalidArgument("required", field="address")
    check_text(registration.address, "address", 256)
    check_text(registration.worker_id, "worker_id", MAX_NAME_CHARS)
    check_text(registration.instance_id, "instance_id", MAX_INSTANCE_ID_CHARS)
    check_text(registration.previous_instance_id, "previous_instance_id", MAX_INSTANCE_ID_CHARS)
    _check_count(registration.max_lora_rank, "max_lora_rank")
    _check_count(registration.num_adapter_slots, "num_adapter_slots")
    worker_id = registration.worker_id or uuid.uuid4().hex
    upsert_base_model(session, registration.spec, worker_id, live_within_s)
    lock_until_commit(session, f"worker:{worker_id}")  # one id registering twice at once: as above
    worker = session.get(Worker, worker_id, with_for_update=True)
    now = utc_now()
    if worker is None:
        worker = Worker(id=worker_id, registered_at=now)
        session.add(worker)
    elif live_within_s is not None:
        _check_not_held(worker, registration, _live_window(live_within_s, now))
    if (
        worker.left_at is not None
        and registration.instance_id
        and registration.instance_id == worker.instance_id
    ):
        # A run leaves only as it stops: a registration of it that arrives after its leave (one its heartbeat
        # loop had in flight when the stop cancelled it) would make the stopped worker live again.
        raise FailedPrecondition(
            f"{registration.instance_id!r} of worker_id {worker.id!r} left at {worker.left_at.isoformat()}: "
            "a run that left does not register again",
            field="instance_id",
        )
    worker.instance_id = registration.instance_id
    worker.left_at = None
    worker.address = registration.address
    worker.base_model_name = registration.spec.name
    worker.max_lora_rank = registration.max_lora_rank
    worker.num_adapter_slots = registration.num_adapter_slots
    worker.last_heartbeat_at = now
    worker.running_requests = worker.waiting_requests = worker.resident_adapters = 0
    session.flush()
    return worker


def _check_holds(worker: Worker, instance_id: str) -> None:
    """FAILED_PRECONDITION naming instance_id (and the worker id) unless `instance_id` is the run that
    registered the worker last. Another process registered the id since (this one was cut off from the
    control plane past three heartbeat intervals, and another run, a copied state dir or the same
    --worker-id, took it): both would count as one live worker, sharing its request id reservations and
    its usage. An empty instance matches only a registration that named none (a worker that does not say):
    it cannot show it is the run that registered an id that names one."""
    if instance_id == worker.instance_id:
        return
    holder = f"instance {worker.instance_id!r}" if worker.instance_id else "a worker that names no instance"
    raise FailedPrecondition(
        f"{instance_id!r} no longer holds worker_id {worker.id!r}: {holder} at {worker.address} registered "
        "it since (another process); this one must stop serving under that id",
        field="instance_id",
    )


def heartbeat(
    session: Session,
    worker_id: str,
    running_requests: int,
    waiting_requests: int,
    resident_adapters: int,
    instance_id: str = "",
) -> Worker:
    """Records a live worker's load. Refused (`_check_holds`) from an instance that no longer holds the
    id, and from one that left: it cannot count as live again without registering."""
    check_text(instance_id, "instance_id", MAX_INSTANCE_ID_CHARS)
    _check_count(running_requests, "running_requests")
    _check_count(waiting_requests, "waiting_requests")
    _check_count(resident_adapters, "resident_adapter_sha256")
    # Locked: a heartbeat checked against the row another instance is registering over would refresh it.
    worker = session.get(Worker, check_text(worker_id, "worker_id", MAX_NAME_CHARS), with_for_update=True)
    if worker is None:
        raise NotFound(f"worker {worker_id!r} is not registered; register again", field="worker_id")
    _check_holds(worker, instance_id)
    if worker.left_at is not None:
        raise FailedPrecondition(
            f"{instance_id!r} of worker_id {worker_id!r} left at {worker.left_at.isoformat()}; register again",
            field="instance_id",
        )
    worker.last_heartbeat_at = utc_now()
    worker.running_requests = running_requests
    worker.waiting_requests = waiting_requests
    worker.resident_adapters = resident_adapters
    return worker


def deregister_worker(session: Session, worker_id: str, instance_id: str) -> Worker:
    """A worker stopping cleanly leaves: it stops counting as live at once (`Worker.is_live_within`), so
    its rank limit, its base model's dimensions and its id are no longer held for three heartbeat
    intervals. Only the instance holding the id may (`_check_holds`); leaving again is a no-op."""
    if not instance_id:
        raise InvalidArgument("required", field="instance_id")
    check_text(instance_id, "instance_id", MAX_INSTANCE_ID_CHARS)
    worker = session.get(Worker, check_text(worker_id, "worker_id", MAX_NAME_CHARS), with_for_update=True)
    if worker is None:
        raise NotFound(f"worker {worker_id!r} is not registered", field="worker_id")
    _check_holds(worker, instance_id)
    if worker.left_at is None:
        worker.left_at = utc_now()
        worker.running_requests = worker.waiting_requests = worker.resident_adapters = 0
    return worker


@dataclass(frozen=True)
class WorkerStatus:
    """A worker row as an operator reads it: whether it counts as live now, and how old its heartbeat is."""

    worker: Worker
    live: bool
    heartbeat_age_s: float


def list_workers(session: Session, live_within_s: float) -> list[WorkerStatus]:
    now = utc_now()
    window = _live_window(live_within_s, now)
    return [
        WorkerStatus(w, w.is_live_within(*window), max(0.0, (now - w.last_heartbeat_at).total_seconds()))
        for w in session.scalars(select(Worker).order_by(Worker.registered_at, Worker.id))
    ]


def max_lora_rank(session: Session, base_model_name: str, live_within_s: float) -> int | None:
    """The largest LoRA rank a live worker of this base model accepts (`Worker.is_live_within`: worker
    rows outlive their workers); None when no worker is live."""
    return session.scalar(
        select(func.max(Worker.max_lora_rank)).where(
            Worker.base_model_name == base_model_name, Worker.is_live_within(*_live_window(live_within_s))
        )
    )


def check_not_a_base_model_name(session: Session, name: str, field: str) -> None:
    """INVALID_ARGUMENT naming `field` when `name` is a registered base model's: a request naming it means
    that base model (HTTP's `model`, gRPC's `adapter`), so an adapter or mix under it would be served by
    one API and not the other, and a public one would collect royalties from callers of the base model."""
    if session.get(BaseModelRow, name) is not None:
        raise InvalidArgument(f"{name!r} is the name of a base model; choose another", field=field)


def _registered_names(session: Session) -> str:
    """What to name instead of an empty base model: the registered ones (the first MAX_NAMES_LISTED by
    name), or that a worker must register one first."""
    names = list(
        session.scalars(select(BaseModelRow.name).order_by(BaseModelRow.name).limit(MAX_NAMES_LISTED + 1))
    )
    if not names:
        return "none is (a worker serving it must register first)"
    listed = ", ".join(repr(n) for n in names[:MAX_NAMES_LISTED])
    return f"name one of {listed}{', ...' if len(names) > MAX_NAMES_LISTED else ''}"


def base_model(session: Session, name: str) -> BaseModelRow:
    """A registered base model by name; FAILED_PRECONDITION naming `base_model` when no worker brought it.
    An empty name means the only registered one, when there is exactly one."""
    if not name:
        only = list(session.scalars(select(BaseModelRow).limit(2)))
        if len(only) != 1:
            raise InvalidArgument(
                f"required when not exactly one base model is registered: {_registered_names(session)}",
                field="base_model",
            )
        return only[0]
    row = session.get(BaseModelRow, check_text(name, "base_model", MAX_NAME_CHARS))
    if row is None:
        raise FailedPrecondition(
            f"base model {name!r} is not registered (a worker serving it must register first)",
            field="base_model",
        )
    return row
