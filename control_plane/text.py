"""Free-text request fields, checked before they reach Postgres (which refuses NUL characters and text
longer than its column) so that such input is INVALID_ARGUMENT naming the field, never INTERNAL."""

from __future__ import annotations

from control_plane.errors import InvalidArgument


def check_text(value: str, field: str, max_chars: int) -> str:
    """Returns `value` when it holds no NUL and at most `max_chars` characters. The message never echoes
    the value (a huge one would not fit in the status)."""
    if "\x00" in value:
        raise InvalidArgument("must not contain NUL characters", field=field)
    if len(value) > max_chars:
        raise InvalidArgument(f"must be at most {max_chars} characters", field=field)
    return value
