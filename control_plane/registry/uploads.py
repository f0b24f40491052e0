"""The domain side of UploadAdapter: the header, the plan checked before any byte is stored, and
the result."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from control_plane.artifacts.upload import ManifestEntry
from control_plane.registry.service import OwnedAdapter
from openlora.base_model import BaseModelSpec


@dataclass(frozen=True)
class UploadHeader:
    name: str
    visibility: str  # "private" or "public"
    base_model: str
    tenant: str
    royalty_micros_per_million_tokens: int
    files: tuple[ManifestEntry, ...]
    keep_warm: bool = False
    description: str = ""


@dataclass(frozen=True)
class UploadPlan:
    """An authorised upload: the owner and the base model the content will be validated against."""

    header: UploadHeader
    tenant_id: uuid.UUID
    base_model: BaseModelSpec
    # The largest rank a worker serving that base model accepts: what the content is validated against.
    max_rank: int


@dataclass(frozen=True)
class UploadResult:
    adapter: OwnedAdapter
    # True when one of the tenant's own adapters already held identical content.
    deduplicated: bool
    # The artifact this upload replaced under the same name, if any.
    replaced_sha256: str | None
