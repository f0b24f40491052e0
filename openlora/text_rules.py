"""The rule every free-text field meets before it reaches Postgres (which refuses NUL characters and
text longer than its column), shared by the control plane, which stores the text, and the worker, which
must refuse a request whose usage record the control plane would refuse (a record refused after the
tokens were delivered is dead-lettered, not billed)."""

from __future__ import annotations

import re

# A client-chosen request id: the usage event's key, and the worker's idempotency key.
MAX_REQUEST_ID_CHARS = 128
# The end of the key a second serving of a request id (by another worker) is billed under
# (control_plane.usage.service.another_serving_id): a client's id of that form is refused, or it could
# take the key of another serving and have the two merged into one bill.
SERVING_KEY_SUFFIX = re.compile(r"~[0-9a-f]{16}\Z")
SERVING_KEY_SUFFIX_RULE = "must not end in '~' and 16 lowercase hexadecimal digits (a form the billing keeps)"
# The most request ids a restarted worker asks the control plane to keep reserved when it gives back
# the rest (ReleaseWorkerRequestIds): the control plane refuses more, the worker then leaves all to lapse.
MAX_KEPT_REQUEST_IDS = 10_000
# A tenant's name (the control plane's rule; `up --tenant` checks it before anything starts).
TENANT_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
TENANT_NAME_RULE = "1..64 characters of [A-Za-z0-9_.-]"


def text_problem(value: str, max_chars: int) -> str | None:
    """Why `value` cannot be stored as text of at most `max_chars` characters, or None. Never echoes the
    value (a huge one would not fit in a status message)."""
    if "\x00" in value:
        return "must not contain NUL characters"
    if len(value) > max_chars:
        return f"must be at most {max_chars} characters"
    return None


# C0 and C1 control characters, DEL, and the Unicode line and paragraph separators.
_CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def identifier_problem(value: str, max_chars: int) -> str | None:
    """`text_problem`, and no control characters: an identifier a client chooses (a request id) is
    written into log lines and echoed in response headers (`X-Request-Id`), where a line break forges a
    log line and a control character is not header text. Checked where a request enters; the control
    plane keeps `text_problem` for ids it already stored or that a spool still holds."""
    problem = text_problem(value, max_chars)
    if problem is None and _CONTROL_CHARACTERS.search(value):
        return "must not contain control characters or line separators"
    return problem


# Control characters but tab and line feed: what prose may not hold.
_PROSE_CONTROL_CHARACTERS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def prose_problem(value: str, max_chars: int) -> str | None:
    """`text_problem`, and no control characters but tab and line feed: a description one tenant writes
    is read by others (a public adapter's, through ListAdapters), and an escape sequence in it would
    drive their terminal (clear the screen, retitle the window, colour what follows)."""
    problem = text_problem(value, max_chars)
    if problem is None and _PROSE_CONTROL_CHARACTERS.search(value):
        return "must not contain control characters other than tab and line feed"
    return problem


# A caller's value quoted in a status message: at most this many characters of it.
MAX_QUOTED_CHARS = 64
# A status message (grpc-message, sent percent-encoded in trailing metadata that the client caps at 16 KiB
# with every other header): at most this many characters; what is past it is cut.
MAX_STATUS_CHARS = 1024


def quoted(value: str, max_chars: int = MAX_QUOTED_CHARS) -> str:
    """repr(value), cut to its first `max_chars` characters with the length said, for an error message."""
    if len(value) <= max_chars:
        return repr(value)
    return f"{value[:max_chars]!r}... ({len(value)} characters)"


def bounded_status(message: str) -> str:
    """A status message cut to MAX_STATUS_CHARS (a message past the client's header limit reached it as
    RESOURCE_EXHAUSTED "received metadata size exceeds hard limit" instead of the status meant)."""
    if len(message) <= MAX_STATUS_CHARS:
        return message
    return message[:MAX_STATUS_CHARS] + f"... ({len(message) - MAX_STATUS_CHARS} more characters cut)"
