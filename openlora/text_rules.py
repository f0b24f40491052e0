"""The rule every free-text field meets before it reaches Postgres (which refuses NUL characters and
text longer than its column), shared by the control plane, which stores the text, and the worker, which
must refuse a request whose usage record the control plane would refuse (a record refused after the
tokens were delivered is dead-lettered, not billed)."""

from __future__ import annotations

# A client-chosen request id: the usage event's key, and the worker's idempotency key.
MAX_REQUEST_ID_CHARS = 128


def text_problem(value: str, max_chars: int) -> str | None:
    """Why `value` cannot be stored as text of at most `max_chars` characters, or None. Never echoes the
    value (a huge one would not fit in a status message)."""
    if "\x00" in value:
        return "must not contain NUL characters"
    if len(value) > max_chars:
        return f"must be at most {max_chars} characters"
    return None
