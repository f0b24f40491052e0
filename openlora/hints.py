"""Hints the control plane sends workers through a Redis stream: advisory and loss-tolerant.

    XADD openlora:hints MAXLEN ~ 10000 * kind prewarm|demote|invalidate adapter_id ... sha256 ...

- `prewarm`: load this adapter into `tier` ("gpu", "host" or "disk") before `deadline_at`. `reason` says
  what predicted the call: "periodic" (a call on the adapter's grid: the worker keeps the adapter until
  then) or "burst" (calls keep coming: the worker loads it, and its cache ranks it by value as any other).
  A hint without a reason is kept like a periodic one.
- `demote`: it may leave `tier`.
- `invalidate`: `adapter_id` is no longer served as it was (deleted or replaced): forget every cached
  answer naming it. `sha256` is set only when no remaining adapter uses that artifact: then drop it from
  every tier too (empty: other adapters, maybe other tenants', still use the content). With `key_only`
  set, the content is still served under other cache keys (another tenant's private copy, or a public
  adapter): only the key `sha256` and `cache_scope` make is dropped, with the merges built from it, so that
  the deleter's next upload of the same bytes is as cold as if no one else held them, and the other
  holders' copies stay untouched.
- `revoke`: the api key `api_key_id` was revoked: forget every cached answer for it. Never a plaintext key.

`cache_scope` (prewarm, demote, invalidate) is the adapter's cache scope (openlora/cache_scope.py): empty for
public content, the owner's scope for a private adapter. A worker acts on the cache key the two make, the
key its requests for that adapter use; an invalidate that names `sha256` drops every key of that content.

An `invalidate` of a deleted or replaced adapter whose content no adapter uses any more also names
`source_sha256`, that content: every merge built from it is dropped, so the saved mixes built from the
adapter are built again from what it serves now (or refused once deleted). Content other adapters still
use keeps its merges, except those built from the one key a `key_only` invalidate drops.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

from openlora.cache_scope import cache_key, is_scope

HINTS_STREAM = "openlora:hints"
HINTS_MAXLEN = 10_000
HintKind = Literal["prewarm", "demote", "invalidate", "revoke"]
HINT_KINDS: tuple[str, ...] = ("prewarm", "demote", "invalidate", "revoke")


@dataclass(frozen=True)
class Hint:
    kind: HintKind
    adapter_id: str
    sha256: str
    tier: str | None = None
    # Unix seconds by which a prewarm should be done; None: no deadline.
    deadline_at: float | None = None
    issued_at: float = field(default_factory=time.time)
    # The revoked key's id (kind "revoke" only).
    api_key_id: str = ""
    # The content a deleted or replaced adapter served (kind "invalidate" only): merges built from it go.
    source_sha256: str = ""
    # What predicted a prewarm: "periodic", "burst", or "" (unknown: kept like a periodic one).
    reason: str = ""
    # The adapter's cache scope: '' for public content, else its owner's (openlora/cache_scope.py).
    cache_scope: str = ""
    # invalidate only: drop the one cache key `sha256` and `cache_scope` make, not every key of the content.
    key_only: bool = False

    @property
    def cache_key(self) -> str:
        """The worker cache key the hint is about; ValueError when sha256 or the scope is malformed."""
        return cache_key(self.sha256, self.cache_scope)

    @property
    def protects(self) -> bool:
        """Whether a worker should keep the prewarmed adapter until its deadline (not for a burst)."""
        return self.reason != "burst"

    def __post_init__(self) -> None:
        if self.kind not in HINT_KINDS:
            raise ValueError(f"hint kind must be one of {HINT_KINDS}, got {self.kind!r}")
        if self.cache_scope and not is_scope(self.cache_scope):
            raise ValueError(f"malformed cache_scope {self.cache_scope[:40]!r}")

    def to_fields(self) -> dict[str, str]:
        """Stream entry fields (strings; absent optionals are left out)."""
        fields = {
            "kind": self.kind,
            "adapter_id": self.adapter_id,
            "sha256": self.sha256,
            "issued_at": repr(self.issued_at),
        }
        if self.tier is not None:
            fields["tier"] = self.tier
        if self.deadline_at is not None:
            fields["deadline_at"] = repr(self.deadline_at)
        if self.api_key_id:
            fields["api_key_id"] = self.api_key_id
        if self.source_sha256:
            fields["source_sha256"] = self.source_sha256
        if self.reason:
            fields["reason"] = self.reason
        if self.cache_scope:
            fields["cache_scope"] = self.cache_scope
        if self.key_only:
            fields["key_only"] = "1"
        return fields

    @classmethod
    def from_fields(cls, fields: dict[str | bytes, str | bytes]) -> Hint:
        """Parses an entry as redis-py returns it (bytes or str keys and values); ValueError if malformed."""
        text = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in fields.items()
        }
        try:
            return cls(
                kind=text["kind"],  # type: ignore[arg-type]
                adapter_id=text["adapter_id"],
                sha256=text["sha256"],
                tier=text.get("tier"),
                deadline_at=float(text["deadline_at"]) if "deadline_at" in text else None,
                issued_at=float(text["issued_at"]),
                api_key_id=text.get("api_key_id", ""),
                source_sha256=text.get("source_sha256", ""),
                reason=text.get("reason", "")[:32],
                cache_scope=text.get("cache_scope", ""),
                key_only=text.get("key_only", "") == "1",
            )
        except KeyError as e:
            raise ValueError(f"hint is missing field {e.args[0]!r}") from None
