"""Typed errors a caller can cause; the server maps them to status codes."""

from __future__ import annotations


class EngineError(Exception):
    """Base of the engine's domain errors."""


class InvalidRequest(EngineError):
    """A request field is out of range or malformed (INVALID_ARGUMENT)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class AdapterLoadError(EngineError):
    """An adapter was refused: missing, malformed, or made for another base model (INVALID_ARGUMENT)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class QueueFull(EngineError):
    """The waiting queue is at its bound (RESOURCE_EXHAUSTED)."""


class EngineDead(EngineError):
    """The engine loop stopped on an internal fault; no request can be served (UNAVAILABLE)."""
