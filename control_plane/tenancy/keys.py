"""API key secrets: `olk_<prefix>_<secret>`. Only the prefix (for lookup and display), a per-key salt
and HMAC-SHA256(salt, key) are stored, so a stolen table reveals no usable key."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

KEY_PREFIX = "olk_"
_KEY = re.compile(r"^olk_(?P<prefix>[0-9a-f]{12})_[A-Za-z0-9_-]{20,}$")


@dataclass(frozen=True)
class HashedKey:
    prefix: str
    salt_hex: str
    secret_hash_hex: str


def lookup_prefix(key: str) -> str:
    """The stored prefix of a key. Keys not in our format (an operator-chosen OPENLORA_ADMIN_KEY) get a
    prefix derived from their digest."""
    match = _KEY.fullmatch(key)
    if match:
        return match["prefix"]
    return "x" + hashlib.sha256(key.encode()).hexdigest()[:11]


def display_prefix(prefix: str) -> str:
    return f"{KEY_PREFIX}{prefix}"


def hash_key(key: str, salt_hex: str) -> str:
    return hmac.new(bytes.fromhex(salt_hex), key.encode(), hashlib.sha256).hexdigest()


def hashed(key: str) -> HashedKey:
    salt_hex = secrets.token_hex(16)
    return HashedKey(lookup_prefix(key), salt_hex, hash_key(key, salt_hex))


def generate_key() -> str:
    return f"{KEY_PREFIX}{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"


def matches(key: str, salt_hex: str, secret_hash_hex: str) -> bool:
    return hmac.compare_digest(hash_key(key, salt_hex), secret_hash_hex)
