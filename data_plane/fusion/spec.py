"""MergeSpec: what a merge is made of, in canonical form, with its content key and its DARE seed.

Two requests that ask for the same merge (same sources by cache key, i.e. by content within one cache
scope (openlora/cache_scope.py); same weights, method and options, in any order, under any names) get the
same spec, hence the same random masks on every worker and after every restart. A merge is built once
per spec and caller: its key also holds the scope of the tenant that asked (`scope`), so one tenant's
cached merge is never another's. A recipe of public adapters is the same spec for everyone; shared, a
tenant learned from `cache_tier` and the load time that another had asked for exactly those members,
weights and options (its merge was on the device already).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from openlora.mix_rules import MERGE_METHODS

# Bumped when the merge computation changes, so that old derived artifacts are never served for a spec.
MERGE_FORMAT_VERSION = 1
METHODS = MERGE_METHODS
SIGN_METHODS = ("total", "frequency")
# Methods that elect a sign per parameter; the others ignore majority_sign_method.
_ELECTING = ("ties", "dare_ties")


@dataclass(frozen=True)
class MergeSource:
    key: str  # cache key of the source adapter artifact: its content sha256, scoped when private
    weight: float
    path: Path | None = None  # local PEFT directory, once the artifact is on disk


@dataclass(frozen=True)
class MergeSpec:
    """A merge in canonical form: sources sorted by key; options normalized (1.0 density, no sign
    method where the method ignores them)."""

    sources: tuple[MergeSource, ...]
    method: str
    density: float
    majority_sign_method: str | None
    scope: str = ""  # the cache scope of the tenant that asked: part of the key, not of the seed

    @classmethod
    def of(
        cls,
        sources: list[tuple[str, float]] | tuple[tuple[str, float], ...],
        method: str,
        density: float = 1.0,
        majority_sign_method: str = "total",
        scope: str = "",
    ) -> MergeSpec:
        """The canonical spec of `(cache key, weight)` sources merged by `method`; raises ValueError for a
        spec no request can carry (validation refuses those first)."""
        if method not in METHODS:
            raise ValueError(f"unknown merge method {method!r}; supported: {', '.join(METHODS)}")
        if not 0 < density <= 1:
            raise ValueError(f"density must be in (0, 1], got {density}")
        if majority_sign_method not in SIGN_METHODS:
            raise ValueError(f"unknown majority_sign_method {majority_sign_method!r}")
        if not sources:
            raise ValueError("a merge needs at least one source")
        keys = [key for key, _ in sources]
        if len(set(keys)) != len(keys):
            raise ValueError("a merge names one source twice")
        ordered = tuple(MergeSource(key, float(weight)) for key, weight in sorted(sources))
        return cls(
            sources=ordered,
            method=method,
            density=float(density),
            majority_sign_method=majority_sign_method if method in _ELECTING else None,
            scope=scope,
        )

    def canonical_json(self) -> str:
        """The spec as canonical JSON: what the seed and the key are computed from."""
        return json.dumps(
            {
                "sources": [[s.key, s.weight] for s in self.sources],
                "method": self.method,
                "density": self.density,
                "majority_sign_method": self.majority_sign_method,
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    @property
    def seed(self) -> int:
        """The DARE seed: 63 bits of the canonical spec's sha256 (the same on every worker)."""
        digest = hashlib.sha256(b"openlora-merge-seed\0" + self.canonical_json().encode()).digest()
        return int.from_bytes(digest[:8], "big") >> 1

    def key(self, max_rank: int) -> str:
        """The content key of the derived artifact this spec builds on a worker whose slots hold at most
        `max_rank` (the re-factorized rank is min(max_rank, sum of the sources' ranks)), for its scope."""
        scope = f"\0{self.scope}" if self.scope else ""
        text = f"openlora-merge-v{MERGE_FORMAT_VERSION}\0{max_rank}{scope}\0{self.canonical_json()}"
        return hashlib.sha256(text.encode()).hexdigest()

    def with_paths(self, paths: dict[str, Path]) -> MergeSpec:
        """The same spec with each source's local directory (`paths` by key)."""
        sources = tuple(MergeSource(s.key, s.weight, Path(paths[s.key])) for s in self.sources)
        return MergeSpec(sources, self.method, self.density, self.majority_sign_method, self.scope)

    def member_seed(self, layer: int, module: str, key: str) -> int:
        """The seed of one source's DARE mask on one module: independent of the others and of order."""
        text = f"{self.seed}\0{layer}\0{module}\0{key}"
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1
