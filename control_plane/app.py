"""The control plane's service layer: each method is one use case in one transaction, called by exactly
one RPC. Methods are synchronous (SQLAlchemy sessions); the gRPC servicers run them in threads.

Callers pass the raw credential they received; authentication happens inside the same transaction."""

from __future__ import annotations

import hmac
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy.exc import DataError, DBAPIError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from control_plane.artifacts.lock import lock_artifact
from control_plane.artifacts.slots import UploadSlots
from control_plane.artifacts.store import ArtifactMissing, ArtifactStore
from control_plane.artifacts.upload import Upload
from control_plane.billing import service as billing
from control_plane.config import ControlPlaneConfig
from control_plane.db.base import utc_now
from control_plane.errors import (
    Cancelled,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from control_plane.hints.publisher import HintPublisher
from control_plane.mixes import service as mixes
from control_plane.registry import catalog
from control_plane.registry import service as registry
from control_plane.registry.models import VISIBILITY_PRIVATE, VISIBILITY_PUBLIC, Adapter
from control_plane.registry.uploads import UploadHeader, UploadPlan, UploadResult
from control_plane.tenancy import service as tenancy
from control_plane.tenancy.models import SCOPE_INFER, ApiKey, Tenant
from control_plane.text import check_text
from control_plane.usage import reservation
from control_plane.usage import service as usage
from control_plane.workers import service as workers
from control_plane.workers.models import Worker
from openlora.adapter_format import AdapterFormatError, validate_adapter_dir
from openlora.artifact import digest_dir
from openlora.text_rules import prose_problem

log = logging.getLogger(__name__)

MAX_DESCRIPTION_CHARS = 4096
# Names one Authorize resolves: a request names an adapter and at most 8 mix members (the workers refuse
# more before they call); a caller asking for more is refused before any query.
MAX_AUTHORIZE_NAMES = 16
# A worker whose last heartbeat is older than this many heartbeat intervals no longer counts as serving.
LIVE_HEARTBEATS = 3
# A start publishes again the revocations of this last while (the newest this many): a revoke hint waits
# for Redis in memory only, so one a stopped control plane never published ended no running stream.
REPUBLISHED_REVOCATIONS_S = 3600
MAX_REPUBLISHED_REVOCATIONS = 1000


@dataclass(frozen=True)
class Authorization:
    tenant_id: uuid.UUID
    tenant_name: str
    scopes: tuple[str, ...]
    # Parallel to the names asked for: an adapter, or a saved mix of the caller's tenant.
    adapters: tuple[Adapter | mixes.ResolvedMix, ...]
    cache_ttl_ms: int
    # The resolved key's id: a "revoke" hint names it.
    api_key_id: uuid.UUID | None = None


class ControlPlane:
    def __init__(
        self,
        config: ControlPlaneConfig,
        sessions: sessionmaker[Session],
        store: ArtifactStore,
        publisher: HintPublisher,
    ) -> None:
        self.config = config
        self.sessions = sessions
        self.store = store
        self.publisher = publisher
        self.upload_slots = UploadSlots()
        self.admin_key_id: uuid.UUID | None = None  # the key it was started with (`bootstrap`)
        # Test hook, called as (stage, plan, sha256): "published" inside the artifact's lock after the
        # files are in place and before the row is written; "failed" after an upload that published new
        # files failed, before they are removed if unreferenced.
        self.upload_stage_hook: Callable[[str, UploadPlan, str], None] | None = None

    # -- tenancy --------------------------------------------------------------------------------------

    def bootstrap(self) -> tenancy.Bootstrap:
        with self.sessions.begin() as s:
            bootstrap = tenancy.ensure_operator(s, self.config.admin_key)
        self.admin_key_id = bootstrap.admin_key_id
        return bootstrap

    def republish_revocations(self) -> int:
        """Publishes the revoke hints of the keys revoked in the last REPUBLISHED_REVOCATIONS_S again (at
        start): one that Redis had not taken when the control plane stopped, or that the control plane
        stopped before publishing, was lost, and a running stream of its key went on to its end after Redis
        was back. Workers that already heard of a revocation only find nothing more to drop. Returns how
        many were published or kept for Redis."""
        since = utc_now() - timedelta(seconds=REPUBLISHED_REVOCATIONS_S)
        with self.sessions.begin() as s:
            key_ids = tenancy.keys_revoked_since(s, since, MAX_REPUBLISHED_REVOCATIONS)
        for key_id in reversed(key_ids):  # in the order they were revoked
            self.publisher.revoke(str(key_id))
        return len(key_ids)

    def create_tenant(self, api_key: str, name: str) -> Tenant:
        with self.sessions.begin() as s:
            return tenancy.create_tenant(s, tenancy.authenticate_admin(s, api_key), name)

    def create_api_key(self, api_key: str, tenant: str, scopes: list[str]) -> tuple[ApiKey, str, str]:
        """Returns (key, tenant name, plaintext secret)."""
        with self.sessions.begin() as s:
            row, secret = tenancy.create_api_key(s, tenancy.authenticate_admin(s, api_key), tenant, scopes)
            return row, tenancy.tenant_name(s, row.tenant_id), secret

    def revoke_api_key(self, api_key: str, key_id: str) -> tuple[ApiKey, str]:
        with self.sessions.begin() as s:
            caller = tenancy.authenticate_admin(s, api_key)
            row = tenancy.revoke_api_key(s, caller, key_id, self.admin_key_id)
            revoked = row, tenancy.tenant_name(s, row.tenant_id)
        # After the commit: a worker that drops its cached answer must then be refused.
        self.publisher.revoke(str(row.id))
        return revoked

    # -- registry -------------------------------------------------------------------------------------

    def prepare_upload(self, api_key: str, header: UploadHeader) -> UploadPlan:
        """Authorises an upload and checks its header before any byte is stored."""
        registry.check_name(header.name)
        if header.visibility not in (VISIBILITY_PRIVATE, VISIBILITY_PUBLIC):
            raise InvalidArgument("must be private or public", field="visibility")
        billing.check_rate(header.royalty_micros_per_million_tokens, "royalty_micros_per_million_tokens")
        check_text(header.description, "description", MAX_DESCRIPTION_CHARS, rule=prose_problem)
        with self.sessions.begin() as s:
            tenant = tenancy.tenant_for(s, tenancy.authenticate_admin(s, api_key), header.tenant)
            workers.check_not_a_base_model_name(s, header.name, "name")
            mixes.check_adapter_name_free(s, tenant.id, header.name)
            registry.check_public_name_free(s, tenant.id, header.name, header.visibility)
            _check_royalty_not_raised(registry.named_terms(s, tenant.id, header.name), header)
            spec = workers.base_model(s, header.base_model).to_spec()
            max_rank = self._max_rank(s, spec.name)
        return UploadPlan(header, tenant.id, spec, max_rank)

    def _max_rank(self, session: Session, base_model_name: str) -> int:
        """Workers choose their rank limit (--max-lora-rank): an adapter is refused only past the largest a
        live worker of its base model accepts (uploads were refused past 64 whatever they accepted); with
        none live, the control plane's own limit."""
        return (
            workers.max_lora_rank(session, base_model_name, self._live_within_s) or self.config.max_lora_rank
        )

    def begin_upload(self, plan: UploadPlan) -> Upload:
        """Takes one of the tenant's upload slots (ResourceExhausted when it has none left, or the control
        plane has none) and opens the upload's temporary directory. Every upload begun is ended by
        `end_upload`, whatever happened to it."""
        self.upload_slots.acquire(plan.tenant_id)
        try:
            return self.store.begin_upload(list(plan.header.files), self.config.max_adapter_size_bytes)
        except BaseException:
            self.upload_slots.release(plan.tenant_id)
            raise

    def end_upload(self, plan: UploadPlan, upload: Upload) -> None:
        """Removes whatever of the upload is left in the temporary directory (nothing once it was
        published) and gives its slot back."""
        try:
            upload.abort()
        finally:
            self.upload_slots.release(plan.tenant_id)

    def complete_upload(
        self, plan: UploadPlan, upload: Upload, abandoned: Callable[[], bool] | None = None
    ) -> UploadResult:
        """Validates the received files, publishes them under their sha256, then writes the READY row.
        On any failure nothing is left: no temporary files, no row, no newly published artifact.
        `abandoned()` (the call was cancelled meanwhile) is asked last before the row commits: True rolls
        everything back, as a failure does, for a client that went away and was told nothing was stored."""
        directory = upload.finish()
        try:
            info = validate_adapter_dir(
                directory, plan.base_model, plan.max_rank, self.config.max_adapter_size_bytes
            )
        except AdapterFormatError as e:
            raise InvalidArgument(e.reason, field=e.field) from None
        sha256 = digest_dir(directory)
        header = plan.header
        record = registry.AdapterRecord(
            header.name,
            header.visibility,
            header.royalty_micros_per_million_tokens,
            header.keep_warm,
            header.description,
        )
        created = False
        try:
            with self.sessions.begin() as s:
                # Publication and the row commit under the artifact's lock, which a cleanup also takes:
                # files found in place here cannot be removed before this row points to them. The content
                # this upload replaces is locked too (both in one order), as a delete locks what it drops:
                # else a concurrent replacement or delete of another adapter of that content saw this one
                # still READY, and neither dropped the content or the tenant's own cache key of it. What
                # the name serves is read under its own lock, so it stays so until this commits.
                registry.lock_served_content(s, plan.tenant_id, header.name)
                replacing = registry.ready_key(s, plan.tenant_id, header.name)
                for content in sorted({sha256} | ({replacing.sha256} if replacing else set())):
                    lock_artifact(s, content)
                # Whether the tenant's own adapters already use this content: only then may the upload
                # read (and take the time to check) the stored copy, or report it as deduplicated.
                already_own = registry.tenant_holds(s, plan.tenant_id, sha256)
                created = self.store.publish(directory, sha256, check_stored=already_own)
                self._upload_stage("published", plan, sha256)
                tenant = s.get(Tenant, plan.tenant_id)
                base_model = workers.base_model(s, plan.base_model.name)
                if base_model.fingerprint != plan.base_model.fingerprint:
                    raise FailedPrecondition("the base model changed during the upload", field="base_model")
                # The name was free of mixes when the upload began; a CreateMix may have taken it since.
                registry.lock_name(s, tenant.id, header.name)
                mixes.check_adapter_name_free(s, tenant.id, header.name)
                if header.visibility == VISIBILITY_PUBLIC:
                    registry.lock_public_name(s, header.name)
                    registry.check_public_name_free(s, tenant.id, header.name, header.visibility)
                was = registry.named_terms(s, tenant.id, header.name)
                _check_royalty_not_raised(was, header)  # again, row locked: uploads of the name may race
                owned, replaced = registry.record_upload(s, tenant, base_model, record, info, sha256)
                if abandoned is not None and abandoned():
                    raise Cancelled("the call was cancelled before the upload was stored")
                # The replaced content is dropped from workers only when no adapter still uses it; its cache
                # key alone when others still serve the content under other keys (see `_invalidate`).
                unused = replaced if replaced is not None and not registry.is_served(s, replaced) else ""
                unused_key = (
                    replacing
                    if replaced is not None and not unused and not registry.key_is_served(s, replacing)
                    else None
                )
        except BaseException:
            if created:
                self._upload_stage("failed", plan, sha256)
                self._remove_unreferenced(sha256)
            raise
        if replaced is not None:
            # Merges built from content another adapter still serves stay valid: only unserved content is named.
            self._invalidate(str(owned.adapter.id), unused, unused_key)
        elif (
            was is not None
            and was.ready
            and (was.visibility, was.royalty, was.keep_warm)
            != (
                owned.adapter.visibility,
                owned.adapter.royalty_micros_per_million_tokens,
                owned.adapter.keep_warm,
            )
        ):
            # Same content, new terms (made private, another royalty, keep-warm switched): workers forget the
            # answers they cached for it at once, as for a delete, instead of serving other tenants on the old
            # ones for a TTL; a worker forgetting an adapter also drops its keep-warm wish (asked again by the
            # next call if it still stands), so a copy no longer kept warm is not pinned until then.
            self.publisher.invalidate(str(owned.adapter.id))
        # Deduplicated only against the tenant's own content: stored files shared with another tenant's
        # (private) adapter are not reported, or an upload would tell who holds which weights.
        # A repair (the stored copy was damaged, this upload rewrote it) stored the files anew: not deduplicated.
        return UploadResult(owned, already_own and not created, replaced)

    def _upload_stage(self, stage: str, plan: UploadPlan, sha256: str) -> None:
        if self.upload_stage_hook is not None:
            self.upload_stage_hook(stage, plan, sha256)

    def _remove_unreferenced(self, sha256: str) -> None:
        """Removes the artifact's files unless a row points to them, deciding under the artifact's lock
        (an upload that found these files in place commits its row before the lock is free)."""
        with self.sessions.begin() as s:
            lock_artifact(s, sha256)
            if not registry.is_referenced(s, sha256):
                self.store.remove(sha256)

    def get_adapter(self, api_key: str, name: str, tenant: str) -> registry.OwnedAdapter:
        with self.sessions.begin() as s:
            owner = tenancy.tenant_for(s, tenancy.authenticate_admin(s, api_key), tenant)
            return registry.get_adapter(s, owner, name)

    def list_adapters(
        self, api_key: str, tenant: str, page_size: int, page_token: str, include_public: bool
    ) -> registry.AdapterPage:
        with self.sessions.begin() as s:
            owner = tenancy.tenant_for(s, tenancy.authenticate_admin(s, api_key), tenant)
            return registry.list_adapters(s, owner, page_size, page_token, include_public)

    def delete_adapter(self, api_key: str, name: str, tenant: str) -> registry.OwnedAdapter:
        registry.check_name(name)  # before `ready_key` looks it up: Postgres refuses a NUL naming no field
        with self.sessions.begin() as s:
            owner = tenancy.tenant_for(s, tenancy.authenticate_admin(s, api_key), tenant)
            # The content's lock first (an upload takes it before its rows too): a concurrent delete of
            # another adapter of this content waits for this one's commit, and its `is_served` /
            # `key_is_served` then see this row deleted (else each saw the other READY: neither dropped
            # the content, nor the deleter's own cache key). What the name serves is read under its own
            # lock (as an upload reads it), so it stays so until this commits.
            registry.lock_served_content(s, owner.id, name)
            current = registry.ready_key(s, owner.id, name)
            if current is not None:
                lock_artifact(s, current.sha256)
            deleted = registry.delete_adapter(s, owner, name)
            sha256 = deleted.adapter.sha256
            # Content-addressed: another adapter (maybe another tenant's) may hold the same sha256.
            unused = "" if registry.is_served(s, sha256) else sha256
            key = registry.key_of(deleted.adapter)
            unused_key = None if unused or registry.key_is_served(s, key) else key
        self._invalidate(str(deleted.adapter.id), unused, unused_key)
        return deleted

    def _invalidate(self, adapter_id: str, unused: str, key: registry.AdapterKey | None) -> None:
        """Publishes the invalidation of a deleted or replaced adapter: its content (`unused`) when no adapter
        serves it any more; else its own cache key (`key`) when no other adapter is served under that key.
        Others' copies of the content are never touched, and the deleter's never kept: a copy kept because
        some other tenant still held the same bytes made the deleter's next upload of them warm
        (`cache_tier`), telling it that someone holds those weights."""
        if unused or key is None:
            self.publisher.invalidate(adapter_id, unused, source_sha256=unused)
        else:
            # No source_sha256: the merges built from other keys of the content (others' copies) stay.
            self.publisher.invalidate(adapter_id, key.sha256, cache_scope=key.scope)

    # -- named mixes ----------------------------------------------------------------------------------

    def create_mix(self, api_key: str, tenant: str, spec: mixes.MixSpec) -> mixes.OwnedMix:
        with self.sessions.begin() as s:
            owner = tenancy.tenant_for(s, tenancy.authenticate_admin(s, api_key), tenant)
            return mixes.create_mix(s, owner, spec, lambda base_model: self._max_rank(s, base_model))

    def list_mixes(self, api_key: str, tenant: str) -> list[mixes.OwnedMix]:
        with self.sessions.begin() as s:
            owner = tenancy.tenant_for(s, tenancy.authenticate_admin(s, api_key), tenant)
            return mixes.list_mixes(s, owner)

    def delete_mix(self, api_key: str, name: str, tenant: str) -> mixes.OwnedMix:
        with self.sessions.begin() as s:
            owner = tenancy.tenant_for(s, tenancy.authenticate_admin(s, api_key), tenant)
            deleted = mixes.delete_mix(s, owner, name)
        # Workers forget their cached answers for the mix (an answer's adapter_id is the mix's id).
        self.publisher.invalidate(str(deleted.mix.id))
        return deleted

    # -- workers --------------------------------------------------------------------------------------

    def check_worker_token(self, token: str) -> None:
        if not token or not hmac.compare_digest(token.encode(), self.config.worker_token.encode()):
            raise Unauthenticated("unknown worker token")

    @property
    def _live_within_s(self) -> float:
        """How recent a live worker's last heartbeat is (`Worker.is_live_within`)."""
        return LIVE_HEARTBEATS * self.config.heartbeat_interval_ms / 1000

    def register_worker(self, registration: workers.WorkerRegistration) -> Worker:
        with self.sessions.begin() as s:
            return workers.register_worker(s, registration, self._live_within_s)

    def heartbeat(
        self, worker_id: str, instance_id: str, running: int, waiting: int, resident: int
    ) -> Worker:
        """FailedPrecondition when `instance_id` no longer holds the id, or left."""
        with self.sessions.begin() as s:
            return workers.heartbeat(s, worker_id, running, waiting, resident, instance_id)

    def deregister_worker(self, worker_id: str, instance_id: str) -> Worker:
        """The instance holding `worker_id` leaves: it stops counting as live at once."""
        with self.sessions.begin() as s:
            return workers.deregister_worker(s, worker_id, instance_id)

    def list_workers(self, api_key: str) -> list[workers.WorkerStatus]:
        with self.sessions.begin() as s:
            tenancy.require_operator(tenancy.authenticate_admin(s, api_key))
            return workers.list_workers(s, self._live_within_s)

    def authorize(self, api_key: str, adapter_names: list[str], base_model: str) -> Authorization:
        """A caller's key -> tenant and scopes, and each named adapter (or saved mix of its tenant, with
        its members resolved the same way) it may use on this base model."""
        if len(adapter_names) > MAX_AUTHORIZE_NAMES:
            raise InvalidArgument(
                f"at most {MAX_AUTHORIZE_NAMES} adapter names per call, got {len(adapter_names)}",
                field="adapters",
            )
        with self.sessions.begin() as s:
            caller = tenancy.authenticate(s, api_key)
            if not caller.may_infer:
                raise PermissionDenied("this key lacks the infer scope")
            fingerprint = workers.base_model(s, base_model).fingerprint if base_model else None
            adapters: list[Adapter | mixes.ResolvedMix] = []
            for name in adapter_names:
                if name:
                    registry.check_requested_name(name)
                # The tenant's own saved mix of that name (no own adapter may share it), else an adapter.
                mix = mixes.find_mix(s, caller.tenant_id, name) if name else None
                if mix is not None:
                    adapters.append(mixes.resolve_mix(s, caller.tenant_id, mix, fingerprint))
                    continue
                adapter = registry.resolve_visible(s, caller.tenant_id, name)
                if fingerprint is not None and adapter.base_model_fingerprint != fingerprint:
                    raise FailedPrecondition(
                        f"adapter {name!r} was made for base model {adapter.base_model_name!r}, "
                        f"not for {base_model!r}",
                        field="adapter",
                    )
                adapters.append(adapter)
        scopes = tuple(sorted({*caller.scopes, SCOPE_INFER}))
        return Authorization(
            caller.tenant_id,
            caller.tenant_name,
            scopes,
            tuple(adapters),
            self.config.authorize_cache_ttl_ms,
            caller.key_id,
        )

    def list_models(
        self, api_key: str, base_model: str, page_size: int, page_token: str
    ) -> catalog.ModelPage:
        """The adapters and saved mixes the caller's key may name on this base model, by name, paged."""
        with self.sessions.begin() as s:
            caller = tenancy.authenticate(s, api_key)
            if not caller.may_infer:
                raise PermissionDenied("this key lacks the infer scope")
            fingerprint = workers.base_model(s, base_model).fingerprint
            return catalog.list_models(s, caller.tenant_id, fingerprint, page_size, page_token)

    def artifact_files(self, sha256: str) -> list[Path]:
        """The artifact's files; NotFound for content nothing stored, ArtifactMissing (DATA_LOSS) for content
        an adapter points at whose copy is gone from the store."""
        try:
            return self.store.files(sha256)
        except NotFound:
            with self.sessions.begin() as s:
                if registry.artifact_referenced(s, sha256):
                    log.error("stored artifact %s is missing; adapters point at it", sha256)
                    raise ArtifactMissing(sha256) from None
            raise

    def reserve_request_id(self, tenant_id: str, request_id: str, worker_id: str, ttl_ms: int) -> None:
        """AlreadyExists when the id was billed or another worker's live reservation holds it."""
        with self.sessions.begin() as s:
            refusal = reservation.reserve_request_id(s, tenant_id, request_id, worker_id, ttl_ms)
        if refusal is not None:
            raise refusal

    def reserve_request_ids(self, entries: list[tuple[str, str, str, int]]) -> list[DomainError | None]:
        """reserve_request_id for each (tenant id, request id, worker id, ttl ms), in one transaction;
        each entry's refusal (AlreadyExists, or the InvalidArgument its check raised before any
        statement), or None where it was reserved, in the entries' order. The rows are taken in (tenant,
        request id) order, the same in every batch, so that two batches never wait on each other in a
        cycle; expired rows are swept first, in a transaction of their own. Should the database refuse a
        statement of the batch (a value, a deadlock, a lock it would wait too long for), each entry is
        answered again in a transaction of its own: one entry costs the others nothing."""
        order = sorted(range(len(entries)), key=lambda i: (entries[i][0], entries[i][1]))
        with self.sessions.begin() as s:
            reservation.sweep_for(s, len(entries))
        outcomes: dict[int, DomainError | None] = {}
        try:
            with self.sessions.begin() as s:
                answers = reservation.reserve_request_ids(s, [entries[i] for i in order])
            outcomes.update(zip(order, answers, strict=True))
        except DBAPIError as error:
            if not _answerable_alone(error):
                raise
            outcomes.clear()
            for i in order:
                try:
                    with self.sessions.begin() as s:
                        outcomes[i] = self._reserve_one(s, *entries[i])
                except DataError:
                    outcomes[i] = InvalidArgument("a value is too long or out of range for its field")
                except IntegrityError:  # the one foreign key: the tenant
                    outcomes[i] = InvalidArgument(f"no such tenant: {entries[i][0]!r}", field="tenant_id")
        return [outcomes[i] for i in range(len(entries))]

    @staticmethod
    def _reserve_one(
        s: Session, tenant_id: str, request_id: str, worker_id: str, ttl_ms: int
    ) -> DomainError | None:
        try:
            return reservation.reserve_request_id(s, tenant_id, request_id, worker_id, ttl_ms, sweep=False)
        except InvalidArgument as error:  # the checks come before any statement: nothing to undo
            return error

    def release_request_id(self, tenant_id: str, request_id: str, worker_id: str) -> bool:
        with self.sessions.begin() as s:
            return reservation.release_request_id(s, tenant_id, request_id, worker_id)

    def release_worker_request_ids(self, worker_id: str, keep: list[tuple[str, str]]) -> int:
        """A restarted worker's reservations given back, but for the ids its spool still bills."""
        with self.sessions.begin() as s:
            return reservation.release_worker_request_ids(s, worker_id, keep)

    def check_request_id(self, tenant_id: str, request_id: str) -> None:
        """AlreadyExists when the tenant's client-chosen request id was already served and billed."""
        with self.sessions.begin() as s:
            usage.check_request_id_unused(s, tenant_id, request_id)

    def report_usage(self, reports: list[usage.UsageReport]) -> usage.ReportOutcome:
        with self.sessions.begin() as s:
            return usage.report_usage(s, reports)

    # -- usage and billing ----------------------------------------------------------------------------

    def get_usage(
        self, api_key: str, tenant: str, start: datetime | None, end: datetime | None
    ) -> usage.UsageSummary:
        with self.sessions.begin() as s:
            owner = tenancy.tenant_for(s, tenancy.authenticate_admin(s, api_key), tenant)
            return usage.get_usage(s, owner, start, end)

    def get_invoice(self, api_key: str, tenant: str, period: str) -> billing.Invoice:
        with self.sessions.begin() as s:
            owner = tenancy.tenant_for(s, tenancy.authenticate_admin(s, api_key), tenant)
            return billing.compute_invoice(s, owner, period)

    def set_price(self, api_key: str, base_model: str, prompt_micros: int, completion_micros: int) -> None:
        with self.sessions.begin() as s:
            tenancy.require_operator(tenancy.authenticate_admin(s, api_key))
            billing.set_price(s, base_model, prompt_micros, completion_micros)


def _check_royalty_not_raised(was: registry.NamedTerms | None, header: UploadHeader) -> None:
    """An adapter's royalty may be lowered, never raised, under its name, deleted or not: invoices apply
    the rate in force when they are computed, so a raise would bill other tenants anew for tokens they
    used before it (a deleted adapter's row, and its past usage, come back when its name is uploaded)."""
    if was is not None and header.royalty_micros_per_million_tokens > was.royalty:
        raise FailedPrecondition(
            f"would raise the royalty from {was.royalty} to {header.royalty_micros_per_million_tokens}, which "
            "would reprice tokens already used; publish the adapter under a new name to charge more",
            field="royalty_micros_per_million_tokens",
        )


# Deadlock detected, serialization failure, lock not available: the batch's transaction lost to another.
_LOST_TO_ANOTHER = {"40P01", "40001", "55P03"}


def _answerable_alone(error: DBAPIError) -> bool:
    """Whether each entry of a batch that failed with `error` gets its answer in a transaction of its own:
    a value the database refused, or a transaction that lost to another (not the database gone)."""
    if isinstance(error, (DataError, IntegrityError)):
        return True
    return getattr(error.orig, "sqlstate", None) in _LOST_TO_ANOTHER
