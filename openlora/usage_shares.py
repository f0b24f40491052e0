"""How an adapter's share of a request's tokens travels in a usage record, shared by the worker that
writes it and the control plane that bills it, so that every share the worker sends is one the control
plane bills (a share it would round to zero made it refuse the whole record: tokens served, never billed).

A share crosses the wire as a float32 (`UsageAdapter.weight`) and is billed as a decimal with 6 places,
rounded half to even. `wire_share` is that decimal, computed from the float32 the wire will carry."""

from __future__ import annotations

import math
from decimal import ROUND_HALF_EVEN, Decimal

import numpy as np

SHARE_QUANTUM = Decimal("0.000001")
ONE = Decimal(1)


def wire_share(share: float) -> Decimal:
    """`share` as the control plane bills it: its float32 value to 6 decimal places (0 when it rounds to
    zero; a value that is not a finite number >= 0 is 0 too, as it bills nothing)."""
    if not math.isfinite(share) or share <= 0:
        return Decimal(0)
    carried = float(np.float32(share))  # what the wire holds
    if not math.isfinite(carried):  # past float32's range
        return Decimal(0)
    return Decimal(repr(carried)).quantize(SHARE_QUANTUM, rounding=ROUND_HALF_EVEN)
