"""Protobuf <-> domain conversions, and nothing else."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from control_plane.artifacts.upload import ManifestEntry
from control_plane.billing.service import Invoice
from control_plane.errors import InvalidArgument
from control_plane.registry.models import STATUS_READY, VISIBILITY_PRIVATE, VISIBILITY_PUBLIC, Adapter
from control_plane.registry.service import OwnedAdapter
from control_plane.registry.uploads import UploadHeader
from control_plane.tenancy.keys import display_prefix
from control_plane.tenancy.models import SCOPE_ADMIN, SCOPE_INFER, ApiKey, Tenant
from control_plane.usage.service import UsageReport, UsageSummary
from control_plane.workers.service import WorkerRegistration, WorkerStatus
from openlora.base_model import BaseModelSpec
from openlora.v1 import admin_pb2, worker_pb2

_SCOPE_TO_PROTO = {SCOPE_INFER: admin_pb2.SCOPE_INFER, SCOPE_ADMIN: admin_pb2.SCOPE_ADMIN}
_SCOPE_FROM_PROTO = {v: k for k, v in _SCOPE_TO_PROTO.items()}
_VISIBILITY_TO_PROTO = {
    VISIBILITY_PRIVATE: admin_pb2.VISIBILITY_PRIVATE,
    VISIBILITY_PUBLIC: admin_pb2.VISIBILITY_PUBLIC,
}


def timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value.astimezone(UTC))
    return ts


def from_timestamp(ts: Timestamp, field: str) -> datetime:
    """The UTC datetime of a timestamp; INVALID_ARGUMENT naming `field` when outside years 1..9999."""
    try:
        return ts.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise InvalidArgument("is not a valid timestamp (years 1..9999)", field=field) from None


def scopes_to_proto(scopes: tuple[str, ...] | list[str]) -> list[int]:
    return [_SCOPE_TO_PROTO[s] for s in scopes if s in _SCOPE_TO_PROTO]


def scopes_from_proto(scopes) -> list[str]:
    try:
        return [_SCOPE_FROM_PROTO[s] for s in scopes]
    except KeyError as e:
        raise InvalidArgument(f"unknown scope {e.args[0]}", field="scopes") from None


def tenant_to_proto(tenant: Tenant) -> admin_pb2.Tenant:
    return admin_pb2.Tenant(
        id=str(tenant.id),
        name=tenant.name,
        created_at=timestamp(tenant.created_at),
        is_operator=tenant.is_operator,
    )


def key_to_proto(key: ApiKey, tenant_name: str) -> admin_pb2.ApiKey:
    return admin_pb2.ApiKey(
        id=str(key.id),
        tenant=tenant_name,
        prefix=display_prefix(key.prefix),
        scopes=scopes_to_proto(key.scopes),
        created_at=timestamp(key.created_at),
        revoked_at=timestamp(key.revoked_at),
    )


def visibility_from_proto(value: int) -> str:
    if value == admin_pb2.VISIBILITY_PUBLIC:
        return VISIBILITY_PUBLIC
    if value in (admin_pb2.VISIBILITY_PRIVATE, admin_pb2.VISIBILITY_UNSPECIFIED):
        return VISIBILITY_PRIVATE
    return f"<{value}>"


def upload_header_from_proto(header: admin_pb2.UploadAdapterHeader) -> UploadHeader:
    return UploadHeader(
        name=header.name,
        visibility=visibility_from_proto(header.visibility),
        base_model=header.base_model,
        tenant=header.tenant,
        royalty_micros_per_million_tokens=header.royalty_micros_per_million_tokens,
        files=tuple(ManifestEntry(f.filename, f.size_bytes, f.sha256) for f in header.files),
        keep_warm=header.keep_warm,
        description=header.description,
    )


def adapter_to_proto(owned: OwnedAdapter) -> admin_pb2.Adapter:
    a = owned.adapter
    return admin_pb2.Adapter(
        id=str(a.id),
        name=a.name,
        tenant=owned.tenant_name,
        visibility=_VISIBILITY_TO_PROTO.get(a.visibility, admin_pb2.VISIBILITY_UNSPECIFIED),
        base_model=a.base_model_name,
        base_model_fingerprint=a.base_model_fingerprint,
        rank=a.rank,
        alpha=a.alpha,
        use_rslora=a.use_rslora,
        target_modules=a.target_modules,
        sha256=a.sha256,
        size_bytes=a.size_bytes,
        status=admin_pb2.ADAPTER_STATUS_READY
        if a.status == STATUS_READY
        else admin_pb2.ADAPTER_STATUS_DELETED,
        royalty_micros_per_million_tokens=a.royalty_micros_per_million_tokens,
        keep_warm=a.keep_warm,
        created_at=timestamp(a.created_at),
        updated_at=timestamp(a.updated_at),
        description=a.description,
    )


def resolved_adapter_to_proto(a: Adapter) -> worker_pb2.ResolvedAdapter:
    return worker_pb2.ResolvedAdapter(
        name=a.name,
        adapter_id=str(a.id),
        sha256=a.sha256,
        size_bytes=a.size_bytes,
        rank=a.rank,
        alpha=a.alpha,
        use_rslora=a.use_rslora,
        keep_warm=a.keep_warm,
        updated_at=timestamp(a.updated_at),
        cache_scope=a.cache_scope,
    )


def worker_to_proto(status: WorkerStatus) -> admin_pb2.Worker:
    w = status.worker
    return admin_pb2.Worker(
        id=w.id,
        address=w.address,
        base_model=w.base_model_name,
        registered_at=timestamp(w.registered_at),
        last_heartbeat_at=timestamp(w.last_heartbeat_at),
        running_requests=w.running_requests,
        waiting_requests=w.waiting_requests,
        resident_adapters=w.resident_adapters,
        live=status.live,
        heartbeat_age_s=status.heartbeat_age_s,
        left_at=timestamp(w.left_at),
    )


def registration_from_proto(request: worker_pb2.RegisterWorkerRequest) -> WorkerRegistration:
    b = request.base_model
    spec = BaseModelSpec(
        name=b.name,
        architecture=b.architecture,
        hidden_size=b.hidden_size,
        intermediate_size=b.intermediate_size,
        num_layers=b.num_layers,
        num_attention_heads=b.num_attention_heads,
        num_key_value_heads=b.num_key_value_heads,
        head_dim=b.head_dim,
        vocab_size=b.vocab_size,
    )
    return WorkerRegistration(
        worker_id=request.worker_id,
        address=request.address,
        spec=spec,
        fingerprint=b.fingerprint,
        max_lora_rank=request.max_lora_rank,
        num_adapter_slots=request.num_adapter_slots,
        instance_id=request.instance_id,
        previous_instance_id=request.previous_instance_id,
    )


def usage_report_from_proto(event: worker_pb2.UsageEvent) -> UsageReport:
    return UsageReport(
        request_id=event.request_id,
        tenant_id=event.tenant_id,
        adapters=tuple((a.adapter_id, a.weight) for a in event.adapters),
        worker_id=event.worker_id,
        base_model=event.base_model,
        prompt_tokens=event.prompt_tokens,
        completion_tokens=event.completion_tokens,
        queue_ms=event.queue_ms,
        ttft_ms=event.ttft_ms,
        total_ms=event.total_ms,
        finished_at=from_timestamp(event.finished_at, "finished_at")
        if event.HasField("finished_at")
        else None,
        finish_reason=event.finish_reason,
        request_kind=event.request_kind,
        mix_name=event.mix_name,
    )


def usage_to_proto(summary: UsageSummary) -> admin_pb2.GetUsageResponse:
    return admin_pb2.GetUsageResponse(
        rows=[
            admin_pb2.UsageRow(
                adapter=line.adapter,
                adapter_tenant=line.adapter_tenant,
                requests=line.requests,
                prompt_tokens=line.prompt_tokens,
                completion_tokens=line.completion_tokens,
            )
            for line in summary.lines
        ],
        total_requests=summary.total_requests,
        total_prompt_tokens=summary.total_prompt_tokens,
        total_completion_tokens=summary.total_completion_tokens,
    )


def invoice_to_proto(invoice: Invoice) -> admin_pb2.Invoice:
    return admin_pb2.Invoice(
        tenant=invoice.tenant,
        period=invoice.period,
        lines=[
            admin_pb2.InvoiceLine(
                kind=line.kind,
                base_model=line.base_model,
                adapter=line.adapter,
                prompt_tokens=line.prompt_tokens,
                completion_tokens=line.completion_tokens,
                amount_micros=line.amount_micros,
                request_kind=line.request_kind,
                mix=line.mix,
                adapter_owner=line.adapter_owner,
            )
            for line in invoice.lines
        ],
        charges_micros=invoice.charges_micros,
        earnings_micros=invoice.earnings_micros,
        net_micros=invoice.net_micros,
        computed_at=timestamp(invoice.computed_at),
    )
