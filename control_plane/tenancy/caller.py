"""Who is calling: the tenant and scopes an API key resolved to."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from control_plane.tenancy.models import SCOPE_ADMIN, SCOPE_INFER


@dataclass(frozen=True)
class Caller:
    key_id: uuid.UUID
    tenant_id: uuid.UUID
    tenant_name: str
    is_operator: bool
    scopes: tuple[str, ...]

    @property
    def is_admin(self) -> bool:
        return SCOPE_ADMIN in self.scopes

    @property
    def may_infer(self) -> bool:
        # An admin key may also infer.
        return SCOPE_INFER in self.scopes or self.is_admin
