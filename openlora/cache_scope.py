"""Cache keys: which callers may share a cached copy of an adapter's content.

Artifacts are content-addressed (sha256), and a worker's tiers (device slots, host memory, local disk,
merges) would naturally be keyed by that address. But then a tenant who uploads the same bytes as another
tenant's private adapter finds them warm on the first call (`timing.cache_tier`, latency), which tells it
that someone holds those weights and when they are used. So the tiers are keyed by a cache key instead:

- public content: its sha256, shared by every caller (they may all reach it anyway);
- a private adapter's content: `<sha256>-<scope>`, the scope an opaque id of its owner
  (`cache_scope`), so only the owner's own calls ever warm it.

The control plane computes the scope (it knows owners and visibility) and sends it with every resolved
adapter and hint; workers only combine and split keys.
"""

from __future__ import annotations

import hashlib
import re

_SHA256 = re.compile(r"[0-9a-f]{64}")
_SCOPE = re.compile(r"[0-9a-f]{32}")
KEY_PATTERN = re.compile(r"^[0-9a-f]{64}(-[0-9a-f]{32})?$")


def cache_scope(owner_tenant_id: object, private: bool) -> str:
    """'' for content any caller may reach; for a private adapter, 32 hex digits derived from its owner."""
    if not private:
        return ""
    return hashlib.sha256(f"openlora-cache-scope\0{owner_tenant_id}".encode()).hexdigest()[:32]


def cache_key(sha256: str, scope: str = "") -> str:
    """The key a worker caches `sha256` under for callers of `scope`; ValueError for malformed parts."""
    if not _SHA256.fullmatch(sha256):
        raise ValueError(f"malformed artifact sha256 {sha256!r}")
    if not scope:
        return sha256
    if not _SCOPE.fullmatch(scope):
        raise ValueError(f"malformed cache scope {scope!r}")
    return f"{sha256}-{scope}"


def content_of(key: str) -> str:
    """The sha256 of the content a cache key names."""
    return key[:64]


def is_cache_key(text: str) -> bool:
    return KEY_PATTERN.fullmatch(text) is not None


def is_scope(text: str) -> bool:
    return _SCOPE.fullmatch(text) is not None
