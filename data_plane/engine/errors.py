"""Typed errors of the engine (most of them a caller can cause); the server maps them to status codes."""

from __future__ import annotations


class EngineError(Exception):
    """Base of the engine's domain errors.

    Every one crosses a process boundary whole (the engine core's pipe): rebuilt from its message and
    attributes, not by calling its `__init__` again, whose arguments differ from class to class."""

    def __reduce__(self):
        return _rebuild, (type(self), self.args, self.__dict__)


def _rebuild(cls: type[EngineError], args: tuple, state: dict) -> EngineError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


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
    """The engine loop stopped on a fault it cannot go on from; no request can be served (UNAVAILABLE)."""


class NonFiniteLogits(InvalidRequest):
    """The model gave this request NaN or infinite logits: its adapter's weights, its mix weights or its
    prompt drive the model out of float range (INVALID_ARGUMENT); the request fails alone."""

    def __init__(self, field: str) -> None:
        super().__init__(
            field, "produced non-finite logits (NaN or infinity): its weights or mix weights are too large"
        )


class StepFailed(EngineError):
    """An engine step failed on a fault of the worker itself, not of the request (INTERNAL); only the
    requests of that step fail, and the fault is logged with its traceback."""
