"""Server-Sent Events framing of OpenAI's streaming: one `data: <json>` event per chunk, a blank line
after each, and `data: [DONE]` last."""

from __future__ import annotations

import json

DONE = b"data: [DONE]\n\n"
MEDIA_TYPE = "text/event-stream"


def event(payload: dict) -> bytes:
    """One event; the JSON holds no newline, so it is one `data:` line."""
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"
