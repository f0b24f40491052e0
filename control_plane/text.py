"""Free-text request fields, checked before they reach Postgres (which refuses NUL characters and text
longer than its column) so that such input is INVALID_ARGUMENT naming the field, never INTERNAL."""

from __future__ import annotations

from control_plane.errors import InvalidArgument
from openlora.text_rules import prose_problem, text_problem


def check_text(value: str, field: str, max_chars: int) -> str:
    """Returns `value` when it holds no NUL and at most `max_chars` characters (`text_problem`)."""
    problem = text_problem(value, max_chars)
    if problem is not None:
        raise InvalidArgument(problem, field=field)
    return value


def check_prose(value: str, field: str, max_chars: int) -> str:
    """Returns `value` when it meets `prose_problem` (a description other tenants may read)."""
    problem = prose_problem(value, max_chars)
    if problem is not None:
        raise InvalidArgument(problem, field=field)
    return value
