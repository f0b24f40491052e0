"""Conversions of shared domain objects to their protobuf messages, used by both planes."""

from __future__ import annotations

from typing import TypeVar

from openlora.base_model import BaseModelSpec
from openlora.v1 import worker_pb2

M = TypeVar("M")


def assign(message, field: str, value, prefix: str = "") -> None:
    """message.field = value; a value the field cannot carry (a negative number for a uint64, a string for
    a float) is refused with a ValueError naming the field, where protobuf says only "Value out of
    range: -1". `prefix` is the message's path in the request ("sampling.", "mix[1].")."""
    try:
        setattr(message, field, value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{prefix}{field}: {value!r} does not fit the field ({e})") from None


def extend(repeated, path: str, values) -> None:
    """repeated.extend(values), naming the element a value the field cannot carry: `path[i]`."""
    for i, value in enumerate(values):
        try:
            repeated.append(value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}[{i}]: {value!r} does not fit the field ({e})") from None


def message(cls: type[M], prefix: str = "", **fields) -> M:
    """cls(**fields), with a refused value named as `assign` names it."""
    try:
        return cls(**fields)
    except (TypeError, ValueError):
        for name, value in fields.items():
            try:
                cls(**{name: value})
            except (TypeError, ValueError) as e:
                raise ValueError(f"{prefix}{name}: {value!r} does not fit the field ({e})") from None
        raise


def spec_to_proto(spec: BaseModelSpec) -> worker_pb2.BaseModelSpec:
    """The BaseModelSpec a worker announces in RegisterWorkerRequest."""
    return worker_pb2.BaseModelSpec(
        name=spec.name,
        fingerprint=spec.fingerprint,
        architecture=spec.architecture,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_layers=spec.num_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        vocab_size=spec.vocab_size,
    )
