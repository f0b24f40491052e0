"""Free-text request fields, checked before they reach Postgres (which refuses NUL characters and text
longer than its column) so that such input is INVALID_ARGUMENT naming the field, never INTERNAL."""

from __future__ import annotations

from collections.abc import Callable

from control_plane.errors import InvalidArgument
from openlora.text_rules import text_problem


def check_text(
    value: str, field: str, max_chars: int, rule: Callable[[str, int], str | None] = text_problem
) -> str:
    """Returns `value` when `rule` finds no problem with it (by default `text_problem`: no NUL, at most
    `max_chars` characters; `prose_problem` for a description other tenants may read)."""
    problem = rule(value, max_chars)
    if problem is not None:
        raise InvalidArgument(problem, field=field)
    return value
