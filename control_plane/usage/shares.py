"""Exact splitting of a request's tokens across the adapters of a mix, in integer micro-tokens."""

from __future__ import annotations

import math
from decimal import ROUND_HALF_EVEN, Decimal

from control_plane.errors import InvalidArgument

MICROS = 1_000_000
_WEIGHT_QUANTUM = Decimal("0.000001")


def weight_decimal(weight: float, field: str) -> Decimal:
    """A mix weight as an exact decimal with 6 places (float32 noise from the wire is rounded off)."""
    if not math.isfinite(weight) or weight <= 0:
        raise InvalidArgument(f"must be a positive finite number, got {weight}", field=field)
    value = Decimal(repr(float(weight))).quantize(_WEIGHT_QUANTUM, rounding=ROUND_HALF_EVEN)
    if value <= 0:
        raise InvalidArgument(f"rounds to zero at 6 decimal places: {weight}", field=field)
    return value


def split_micro_tokens(tokens: int, weights: list[Decimal]) -> list[int]:
    """Splits `tokens` (as tokens * 1e6 micro-tokens) in proportion to `weights`; the parts sum exactly
    to the whole (largest remainder: leftover micro-tokens go to the largest fractional parts, ties to
    the earlier adapter).

        split_micro_tokens(10, [1, 1, 1]) == [3_333_334, 3_333_333, 3_333_333]
    """
    total = tokens * MICROS
    if len(weights) == 1:
        return [total]
    units = [int(w * MICROS) for w in weights]  # exact: weights have 6 decimal places
    denominator = sum(units)
    parts = [total * u // denominator for u in units]
    remainders = [total * u % denominator for u in units]
    leftover = total - sum(parts)
    for i in sorted(range(len(units)), key=lambda i: (-remainders[i], i))[:leftover]:
        parts[i] += 1
    return parts


def round_half_even(numerator: int, denominator: int) -> int:
    """numerator / denominator rounded to the nearest integer, ties to even, in exact integers."""
    quotient, remainder = divmod(numerator, denominator)
    twice = 2 * remainder
    if twice > denominator or (twice == denominator and quotient % 2 == 1):
        quotient += 1
    return quotient
