"""Errors of named mixes (each maps to a status code through its family, see control_plane.errors)."""

from __future__ import annotations

from control_plane.errors import AlreadyExists, NotFound


class MixNotFound(NotFound):
    def __init__(self, name: str) -> None:
        super().__init__(f"mix {name!r} not found", field="name")


class NameTaken(AlreadyExists):
    """A tenant's adapters and mixes share one namespace: a Generate names either."""

    def __init__(self, name: str, holder: str) -> None:
        super().__init__(f"the tenant already has {holder} named {name!r}", field="name")
