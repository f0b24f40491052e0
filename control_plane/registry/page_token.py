"""ListAdapters page tokens: the last (name, id) of a page, as URL-safe base64 of a two-string JSON array.

A token is opaque to clients and parsed strictly on the way back: a bounded length, only the base64url
alphabet with canonical padding, one flat JSON array of a valid adapter name and a UUID. Anything else
is InvalidArgument naming page_token, never an exception of the parser.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid

from control_plane.errors import InvalidArgument
from openlora.safe_json import JsonFieldError, load_json

# A name of 128 characters and a UUID encode to about 240 characters.
MAX_PAGE_TOKEN_CHARS = 512
_TOKEN = re.compile(r"[A-Za-z0-9_-]+={0,2}", re.ASCII)


def encode_page_token(name: str, adapter_id: uuid.UUID) -> str:
    return base64.urlsafe_b64encode(json.dumps([name, str(adapter_id)]).encode()).decode()


def decode_page_token(token: str, name_pattern: re.Pattern[str]) -> tuple[str, uuid.UUID]:
    """(name, adapter id) of a token from `encode_page_token`; InvalidArgument(page_token) otherwise."""
    malformed = InvalidArgument("malformed: not a token from a previous response", field="page_token")
    if len(token) > MAX_PAGE_TOKEN_CHARS or len(token) % 4 or not _TOKEN.fullmatch(token):
        raise malformed
    try:
        value = load_json(base64.urlsafe_b64decode(token), "page_token", max_depth=1)
    except (binascii.Error, JsonFieldError):
        raise malformed from None
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)):
        raise malformed
    name, adapter_id = value
    if not name_pattern.fullmatch(name):
        raise malformed
    try:
        parsed = uuid.UUID(adapter_id)
    except ValueError:
        raise malformed from None
    if str(parsed) != adapter_id:
        raise malformed
    return name, parsed
