"""Exact splitting of a request's tokens across the adapters of a mix, in integer micro-tokens."""

from __future__ import annotations

from decimal import Decimal

from openlora.usage_shares import ONE

MICROS = 1_000_000


def ensemble_base_share(request_kind: str, shares: list[Decimal]) -> Decimal:
    """The share of an ensemble record billed as the base model: what its adapters' shares leave of 1. A
    worker writes an adapter member's share as its weight over all members' weights divided by the
    number of members (the record's tokens are that many times the tokens delivered), so the rest is
    the base member's share and the work of the other sequences. 0 for any other kind, and for a record
    whose shares add up to 1 or more (a one-member ensemble, or an older worker that scaled them to the
    largest)."""
    if request_kind != "ensemble" or not shares:
        return Decimal(0)
    return max(ONE - sum(shares), Decimal(0))


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
    return _give_leftover(parts, remainders, total - sum(parts))


def round_half_even(numerator: int, denominator: int) -> int:
    """numerator / denominator rounded to the nearest integer, ties to even, in exact integers."""
    quotient, remainder = divmod(numerator, denominator)
    twice = 2 * remainder
    if twice > denominator or (twice == denominator and quotient % 2 == 1):
        quotient += 1
    return quotient


def whole_tokens(micro_tokens: list[int]) -> list[int]:
    """Lines of micro-tokens in whole tokens that add up to their sum rounded half to even: each line is
    its micro-tokens rounded down, plus one for the lines with the largest remainders (ties to the earlier
    line) while the sum is short. Rounding each line on its own let a usage listing's lines fall short of
    its totals: three adapters sharing one mixed token showed 0 tokens each.

        whole_tokens([333_334, 333_333, 333_333]) == [1, 0, 0]
    """
    parts = [m // MICROS for m in micro_tokens]
    remainders = [m % MICROS for m in micro_tokens]
    return _give_leftover(parts, remainders, round_half_even(sum(micro_tokens), MICROS) - sum(parts))


def _give_leftover(parts: list[int], remainders: list[int], leftover: int) -> list[int]:
    """Largest remainder: one more to each of the `leftover` parts with the largest remainders, ties to
    the earlier part."""
    for i in sorted(range(len(parts)), key=lambda i: (-remainders[i], i))[: max(leftover, 0)]:
        parts[i] += 1
    return parts
