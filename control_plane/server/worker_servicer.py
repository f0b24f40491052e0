"""WorkerService: called by data-plane workers with `authorization: Bearer <worker token>`."""

from __future__ import annotations

import asyncio

from control_plane import metrics
from control_plane.app import ControlPlane
from control_plane.errors import InvalidArgument
from control_plane.registry import catalog
from control_plane.server import convert, mix_convert
from control_plane.server.auth import bearer_token
from control_plane.server.interceptor import status_of
from openlora.v1 import worker_pb2, worker_pb2_grpc

# ReserveRequestIds: the entries of one call (one transaction).
MAX_RESERVATIONS_PER_CALL = 256


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, app: ControlPlane) -> None:
        self.app = app

    async def RegisterWorker(self, request, context):
        self.app.check_worker_token(bearer_token(context))
        worker = await asyncio.to_thread(self.app.register_worker, convert.registration_from_proto(request))
        return worker_pb2.RegisterWorkerResponse(
            worker_id=worker.id, heartbeat_interval_ms=self.app.config.heartbeat_interval_ms
        )

    async def Heartbeat(self, request, context):
        self.app.check_worker_token(bearer_token(context))
        await asyncio.to_thread(
            self.app.heartbeat,
            request.worker_id,
            request.instance_id,
            request.running_requests,
            request.waiting_requests,
            len(request.resident_adapter_sha256),
        )
        return worker_pb2.HeartbeatResponse()

    async def DeregisterWorker(self, request, context):
        """The worker's own instance leaves (a clean stop): it stops counting as live at once."""
        self.app.check_worker_token(bearer_token(context))
        await asyncio.to_thread(self.app.deregister_worker, request.worker_id, request.instance_id)
        return worker_pb2.DeregisterWorkerResponse()

    async def Authorize(self, request, context):
        self.app.check_worker_token(bearer_token(context))
        auth = await asyncio.to_thread(
            self.app.authorize, request.api_key, list(request.adapters), request.base_model
        )
        return worker_pb2.AuthorizeResponse(
            tenant_id=str(auth.tenant_id),
            tenant=auth.tenant_name,
            scopes=convert.scopes_to_proto(auth.scopes),
            adapters=[
                mix_convert.resolved_to_proto(name, a)
                for name, a in zip(request.adapters, auth.adapters, strict=True)
            ],
            cache_ttl_ms=auth.cache_ttl_ms,
            api_key_id=str(auth.api_key_id or ""),
        )

    async def ListModels(self, request, context):
        """The caller key's adapters and saved mixes on the base model, one entry per name, paged."""
        self.app.check_worker_token(bearer_token(context))
        page = await asyncio.to_thread(
            self.app.list_models, request.api_key, request.base_model, request.page_size, request.page_token
        )
        return worker_pb2.ListModelsResponse(
            models=[_model_entry(e) for e in page.models],
            next_page_token=page.next_page_token,
        )

    async def FetchArtifact(self, request, context):
        """Streams each file of the artifact in name order, in chunks of at most 1 MiB."""
        self.app.check_worker_token(bearer_token(context))
        paths = await asyncio.to_thread(self.app.artifact_files, request.sha256)
        for path in paths:
            size_bytes = path.stat().st_size
            chunks = self.app.store.read_chunks(path)
            while (piece := await asyncio.to_thread(next, chunks, None)) is not None:
                offset, data = piece
                first = offset == 0
                yield worker_pb2.FetchArtifactResponse(
                    filename=path.name if first else "",
                    offset=offset,
                    data=data,
                    file_size_bytes=size_bytes if first else 0,
                )

    async def CheckRequestId(self, request, context):
        """ALREADY_EXISTS (naming request_id) when the tenant already has usage under that request id."""
        self.app.check_worker_token(bearer_token(context))
        await asyncio.to_thread(self.app.check_request_id, request.tenant_id, request.request_id)
        return worker_pb2.CheckRequestIdResponse()

    async def ReserveRequestId(self, request, context):
        """Reserves the tenant's request id for this worker's stream; ALREADY_EXISTS (naming request_id)
        when it was billed or another worker's live reservation holds it."""
        self.app.check_worker_token(bearer_token(context))
        await asyncio.to_thread(
            self.app.reserve_request_id,
            request.tenant_id,
            request.request_id,
            request.worker_id,
            request.ttl_ms,
        )
        return worker_pb2.ReserveRequestIdResponse()

    async def ReserveRequestIds(self, request, context):
        """ReserveRequestId for each entry, in one transaction; each entry's outcome in order."""
        self.app.check_worker_token(bearer_token(context))
        if len(request.entries) > MAX_RESERVATIONS_PER_CALL:
            raise InvalidArgument(
                f"{len(request.entries)} entries; at most {MAX_RESERVATIONS_PER_CALL} per call",
                field="entries",
            )
        refusals = await asyncio.to_thread(
            self.app.reserve_request_ids,
            [(e.tenant_id, e.request_id, e.worker_id, e.ttl_ms) for e in request.entries],
        )
        outcomes = []
        for refusal in refusals:
            if refusal is None:
                outcomes.append(worker_pb2.RequestIdOutcome())
                continue
            code, message = status_of(refusal)
            outcomes.append(
                worker_pb2.RequestIdOutcome(code=code.value[0], message=message, field=refusal.field or "")
            )
        return worker_pb2.ReserveRequestIdsResponse(outcomes=outcomes)

    async def ReleaseRequestId(self, request, context):
        """Removes this worker's reservation of the id (its stream delivered nothing)."""
        self.app.check_worker_token(bearer_token(context))
        released = await asyncio.to_thread(
            self.app.release_request_id, request.tenant_id, request.request_id, request.worker_id
        )
        return worker_pb2.ReleaseRequestIdResponse(released=released)

    async def ReleaseWorkerRequestIds(self, request, context):
        """Removes every reservation of the worker but those of `keep` (its spool's unrecorded usage)."""
        self.app.check_worker_token(bearer_token(context))
        keep = [(key.tenant_id, key.request_id) for key in request.keep]
        released = await asyncio.to_thread(self.app.release_worker_request_ids, request.worker_id, keep)
        return worker_pb2.ReleaseWorkerRequestIdsResponse(released=released)

    async def ReportUsage(self, request, context):
        """Idempotent by (tenant, request id): a record replaces the stored one only when it outranks it
        (a larger count; a final over a checkpoint), never adds to it. A batch is recorded whole or not
        at all: an invalid event refuses the batch with INVALID_ARGUMENT naming it (`events[i]`)."""
        self.app.check_worker_token(bearer_token(context))
        reports = [convert.usage_report_from_proto(e) for e in request.events]
        outcome = await asyncio.to_thread(self.app.report_usage, reports)
        metrics.USAGE_EVENTS_INSERTED.inc(outcome.inserted)
        metrics.USAGE_EVENTS_DUPLICATE.inc(outcome.duplicates)
        return worker_pb2.ReportUsageResponse(inserted=outcome.inserted, duplicates=outcome.duplicates)


def _model_entry(entry: catalog.ModelEntry) -> worker_pb2.ModelEntry:
    return worker_pb2.ModelEntry(
        name=entry.name,
        kind=entry.kind,
        owned_by=entry.owned_by,
        created_at=convert.timestamp(entry.created_at),
    )
