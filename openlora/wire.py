"""Conversions of shared domain objects to their protobuf messages, used by both planes."""

from __future__ import annotations

from openlora.base_model import BaseModelSpec
from openlora.v1 import worker_pb2


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
