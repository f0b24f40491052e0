"""Uploads in flight, counted per tenant and in all. Each one holds up to the maximum adapter size in the
store's temporary directory until it ends, so their number is what bounds the disk that uploads can take:
at most MAX_UPLOADS_IN_FLIGHT x max_adapter_size_bytes, and one tenant's share of it is
MAX_UPLOADS_IN_FLIGHT_PER_TENANT uploads. The operator's uploads count like any other.

The last RESERVED_FOR_NEW_TENANTS slots are kept for tenants with no upload in flight: a few tenants
each holding their share (slowly, or on purpose) could otherwise fill every slot and lock every other
tenant, the operator included, out of uploading."""

from __future__ import annotations

import threading
import uuid
from collections import Counter

from control_plane.errors import ResourceExhausted

MAX_UPLOADS_IN_FLIGHT_PER_TENANT = 4  # a bulk import may upload a few at a time
MAX_UPLOADS_IN_FLIGHT = 16
RESERVED_FOR_NEW_TENANTS = 4


class UploadSlots:
    """`acquire` takes a tenant's slot or refuses with ResourceExhausted; each acquire is paired with
    exactly one `release`."""

    def __init__(
        self,
        max_per_tenant: int = MAX_UPLOADS_IN_FLIGHT_PER_TENANT,
        max_total: int = MAX_UPLOADS_IN_FLIGHT,
        reserved_for_new_tenants: int = RESERVED_FOR_NEW_TENANTS,
    ) -> None:
        self.max_per_tenant = max_per_tenant
        self.max_total = max_total
        self.reserved = min(reserved_for_new_tenants, max_total - 1)
        self._lock = threading.Lock()
        self._by_tenant: Counter[uuid.UUID] = Counter()

    def acquire(self, tenant_id: uuid.UUID) -> None:
        with self._lock:
            num_tenant = self._by_tenant[tenant_id]
            if num_tenant >= self.max_per_tenant:
                raise ResourceExhausted(
                    f"this tenant already has {num_tenant} uploads in flight, the most it may have at "
                    "once; retry when one of them finishes"
                )
            num_total = self._by_tenant.total()
            if num_total >= self.max_total:
                raise ResourceExhausted(
                    f"the control plane already has {num_total} uploads in flight, the most it takes at "
                    "once; retry when one of them finishes"
                )
            if num_tenant > 0 and num_total >= self.max_total - self.reserved:
                raise ResourceExhausted(
                    f"the control plane has {num_total} uploads in flight and keeps its last "
                    f"{self.reserved} for tenants with none; retry when this tenant's upload finishes"
                )
            self._by_tenant[tenant_id] += 1

    def release(self, tenant_id: uuid.UUID) -> None:
        with self._lock:
            self._by_tenant[tenant_id] -= 1
            if self._by_tenant[tenant_id] <= 0:
                del self._by_tenant[tenant_id]

    def num_in_flight(self, tenant_id: uuid.UUID | None = None) -> int:
        """Uploads in flight for `tenant_id`, or in all when None."""
        with self._lock:
            return self._by_tenant.total() if tenant_id is None else self._by_tenant[tenant_id]
