"""State a worker keeps per distinct value a caller chooses stays within its bound: a tenant with one
key calling many distinct values must not grow the worker without limit."""

from __future__ import annotations

import grpc

from data_plane.engine import llm_engine
from data_plane.server.config import EngineSettings
from openlora.v1 import inference_pb2, inference_pb2_grpc

NUM_SLOTS = 4
MAX_IDLE = 8
NUM_CALLS = 40


def _mix_call(stub, key: str, weight: float) -> None:
    request = inference_pb2.GenerateRequest(
        prompt="hello",
        mix=[
            inference_pb2.AdapterWeight(adapter="ad0", weight=weight),
            inference_pb2.AdapterWeight(adapter="ad1", weight=0.5),
        ],
        mix_method=inference_pb2.MIX_METHOD_LINEAR,
        sampling=inference_pb2.SamplingParams(max_tokens=1),
    )
    list(stub.Generate(request, metadata=(("authorization", f"Bearer {key}"),), timeout=60))


def test_linear_mixes_of_ever_new_weights_keep_bounded_cache_state(system, make_worker, monkeypatch):
    """Each distinct linear mix is a cache key of its own; its usage record and the record of what it was
    built from outlive its slot, but only up to the cache's bound."""
    monkeypatch.setattr(llm_engine, "_MAX_MIX_MEMBERS", MAX_IDLE)
    worker = make_worker(
        engine=EngineSettings(
            num_kv_blocks=256,
            max_num_seqs=16,
            max_lora_rank=16,
            num_adapter_slots=NUM_SLOTS,
            host_cache_bytes=1,
        )
    )
    engine = worker.engine.engine
    engine.adapter_cache.max_idle_usage_records = MAX_IDLE
    _, _, key = system.new_tenant()
    with grpc.insecure_channel(f"127.0.0.1:{worker.port}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        for i in range(NUM_CALLS):
            _mix_call(stub, key, 0.5 + i / 1000)
    assert len(engine.adapter_cache.known_keys()) <= NUM_SLOTS + MAX_IDLE
    # Pruned to the keys the cache knows once it holds twice what its last pruning kept.
    assert len(engine._mix_members) <= 2 * (NUM_SLOTS + MAX_IDLE) + 1
