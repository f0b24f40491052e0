"""TIES / DARE / magnitude-prune mixes through a worker over gRPC (real control plane, Postgres, engine):
built once per canonical spec and served from the worker's tiers after, the build counted as adapter
load, its truncation error exported, bad options refused by name, billed as one request."""

from __future__ import annotations

import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from data_plane.fusion.spec import MergeSpec
from openlora.cache_scope import cache_scope
from openlora.v1 import inference_pb2, inference_pb2_grpc
from tests.worker import conftest as worker

# The worker tests' in-process system (control plane, worker with max_lora_rank 16, adapters ad0..ad7 of
# rank 4 (even) and 8 (odd), public), as fixtures here too.
system = worker.system
tiny_model_dir = worker.tiny_model_dir
PROMPT = "the quick brown fox"
MAX_RANK = 16


def _request(mix, method, max_tokens=8, request_id="", **fields) -> inference_pb2.GenerateRequest:
    request = inference_pb2.GenerateRequest(
        prompt=PROMPT,
        request_id=request_id,
        mix_method=method,
        sampling=inference_pb2.SamplingParams(max_tokens=max_tokens),
        **fields,
    )
    for name, weight in mix:
        request.mix.add(adapter=name, weight=weight)
    return request


def _generate(target: str, key: str, request) -> tuple[list[int], inference_pb2.GenerateResponse]:
    with grpc.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        tokens, last = [], None
        for response in stub.Generate(request, metadata=(("authorization", f"Bearer {key}"),)):
            tokens += response.token_ids
            last = response
    return tokens, last


def _count(system, name: str) -> float:
    return system.worker.metrics.registry.get_sample_value(name) or 0.0


def test_a_merge_is_built_once_per_spec_and_then_served_from_the_tiers(system):
    tenant, _, key = system.new_tenant()
    builds = _count(system, "openlora_merge_build_seconds_count")
    mix = [("ad0", 0.75), ("ad1", 0.25)]
    first_tokens, first = _generate(
        system.target, key, _request(mix, inference_pb2.MIX_METHOD_TIES, density=0.5)
    )
    assert _count(system, "openlora_merge_build_seconds_count") == builds + 1
    assert len(first_tokens) == 8 and first.usage.completion_tokens == 8
    assert first.timing.adapter_load_ms > 0
    assert first.timing.cache_tier in (inference_pb2.CACHE_TIER_DISK, inference_pb2.CACHE_TIER_REMOTE)

    # The same merge asked in another order: the same spec, served from the worker, not rebuilt.
    again_tokens, again = _generate(
        system.target, key, _request(list(reversed(mix)), inference_pb2.MIX_METHOD_TIES, density=0.5)
    )
    assert again_tokens == first_tokens
    assert _count(system, "openlora_merge_build_seconds_count") == builds + 1
    assert again.timing.cache_tier in (
        inference_pb2.CACHE_TIER_DEVICE,
        inference_pb2.CACHE_TIER_HOST,
        inference_pb2.CACHE_TIER_DISK,
    )

    scope = cache_scope(system.tenant_ids[tenant], private=True)
    spec = MergeSpec.of([(system.adapters[n], w) for n, w in mix], "ties", 0.5, scope=scope)
    assert (system.worker.config.state_dir / "merges" / spec.key(MAX_RANK)).is_dir()

    # Another method (or density) is another merge, with other tokens.
    other_tokens, _ = _generate(
        system.target, key, _request(mix, inference_pb2.MIX_METHOD_MAGNITUDE_PRUNE, density=0.25)
    )
    assert _count(system, "openlora_merge_build_seconds_count") == builds + 2
    assert other_tokens != first_tokens


def test_one_tenants_merge_is_never_served_from_the_cache_to_another(system):
    """The same recipe of public adapters is the same merge (same masks, same tokens) for every tenant,
    but each builds its own: a second tenant asking for it found it on the device at 0 ms and so learned
    that someone had asked for exactly those members, weights and options."""
    _, _, first_key = system.new_tenant()
    _, _, second_key = system.new_tenant()
    mix = [("ad2", 0.6337), ("ad3", 0.3663)]
    request = _request(mix, inference_pb2.MIX_METHOD_DARE_TIES, density=0.4)
    first_tokens, _ = _generate(system.target, first_key, request)
    _, warm = _generate(system.target, first_key, request)
    assert warm.timing.cache_tier == inference_pb2.CACHE_TIER_DEVICE  # the asker's own, warm
    builds = _count(system, "openlora_merge_build_seconds_count")
    second_tokens, second = _generate(system.target, second_key, request)
    assert _count(system, "openlora_merge_build_seconds_count") == builds + 1
    assert second.timing.cache_tier != inference_pb2.CACHE_TIER_DEVICE and second.timing.adapter_load_ms > 0
    assert second_tokens == first_tokens


def test_a_truncated_merge_exports_its_truncation_error(system):
    _, _, key = system.new_tenant()
    observed = _count(system, "openlora_merge_truncation_error_ratio_count")
    # Ranks 4 + 8 + 8 = 20 > 16: re-factorized to the worker's limit.
    mix = [("ad2", 0.5), ("ad3", 0.5), ("ad5", 0.5)]
    tokens, last = _generate(
        system.target, key, _request(mix, inference_pb2.MIX_METHOD_DARE_TIES, density=0.5)
    )
    assert len(tokens) == 8 and last.finish_reason
    assert _count(system, "openlora_merge_truncation_error_ratio_count") == observed + 1
    assert _count(system, "openlora_merge_truncation_error_ratio_sum") > 0


def test_merges_run_beside_other_requests(system):
    _, _, key = system.new_tenant()
    requests = [
        _request(
            [("ad4", 0.5), ("ad6", 0.5)], inference_pb2.MIX_METHOD_DARE_LINEAR, density=0.5, max_tokens=6
        ),
        _request([("ad4", 0.5), ("ad6", 0.5)], inference_pb2.MIX_METHOD_LINEAR, max_tokens=6),
        inference_pb2.GenerateRequest(
            prompt=PROMPT, adapter="ad7", sampling=inference_pb2.SamplingParams(max_tokens=6)
        ),
        inference_pb2.GenerateRequest(prompt=PROMPT, sampling=inference_pb2.SamplingParams(max_tokens=6)),
    ]
    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(lambda r: _generate(system.target, key, r), requests))
    assert [len(tokens) for tokens, _ in results] == [6, 6, 6, 6]


def test_a_merged_mix_is_billed_as_one_request_to_its_members(system):
    tenant, _, key = system.new_tenant()
    mix = [("ad0", 0.5), ("ad2", 0.5)]
    tokens, _ = _generate(
        system.target, key, _request(mix, inference_pb2.MIX_METHOD_MAGNITUDE_PRUNE, request_id="merge-billed")
    )
    system.flush_usage()
    usage = system.wait_usage(tenant, 1)
    assert usage.total_requests == 1
    assert {row.adapter for row in usage.rows} >= {"ad0", "ad2"}
    # The request's tokens once (not once per member), split between the members by weight.
    assert sum(row.completion_tokens for row in usage.rows if row.adapter in ("ad0", "ad2")) == len(tokens)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        (dict(density=1.5), "density"),
        (dict(density=0.0), "density"),
        (dict(majority_sign_method=7), "majority_sign_method"),
        (dict(combine=inference_pb2.ENSEMBLE_COMBINE_LOGPROBS), "combine"),
    ],
)
def test_bad_merge_options_are_invalid_argument_naming_the_field(system, fields, field):
    _, _, key = system.new_tenant()
    with pytest.raises(grpc.RpcError) as caught:
        _generate(
            system.target,
            key,
            _request([("ad0", 0.5), ("ad1", 0.5)], inference_pb2.MIX_METHOD_TIES, **fields),
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(field)


def test_the_python_client_asks_for_a_merge_with_its_options(system):
    from openlora.client import Client, build_request

    request = build_request(
        "x", mix={"a": 0.5, "b": 0.5}, mix_method="dare_ties", density=0.25, majority_sign_method="frequency"
    )
    assert (request.mix_method, request.density, request.majority_sign_method) == (
        inference_pb2.MIX_METHOD_DARE_TIES,
        0.25,
        inference_pb2.MAJORITY_SIGN_METHOD_FREQUENCY,
    )
    _, _, key = system.new_tenant()
    mix = [("ad1", 0.5), ("ad3", 0.5)]
    with Client(system.target, key) as client:
        via_client = [
            t
            for r in client.generate_stream(PROMPT, mix=mix, mix_method="ties", density=0.5, max_tokens=8)
            for t in r.token_ids
        ]
    spelled, _ = _generate(system.target, key, _request(mix, inference_pb2.MIX_METHOD_TIES, density=0.5))
    assert via_client == spelled and len(spelled) == 8


@pytest.mark.parametrize(
    "method",
    [
        inference_pb2.MIX_METHOD_TIES,
        inference_pb2.MIX_METHOD_MAGNITUDE_PRUNE,
        inference_pb2.MIX_METHOD_DARE_LINEAR,
    ],
)
def test_a_merge_whose_weighted_deltas_overflow_is_refused_not_internal(system, method):
    """A finite weight that would overflow float32 once it scales a delta is refused naming the mix (by
    the weight bound now, by the merge's overflow check before it), the worker keeps serving."""
    _, _, key = system.new_tenant()
    with pytest.raises(grpc.RpcError) as caught:
        _generate(system.target, key, _request([("ad0", 3.0e38), ("ad1", 1.0)], method))
    assert caught.value.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
    assert "mix" in caught.value.details()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    tokens, _ = _generate(system.target, key, _request([("ad0", 0.5), ("ad1", 0.5)], method))
    assert tokens


@contextlib.contextmanager
def _wider_worker_registered(system, base_model: str, max_lora_rank: int):
    """Another worker of the base model, with a higher rank limit, live while the block runs (then its
    heartbeat is made a day old, so it no longer counts)."""
    import json
    import uuid

    import psycopg

    from control_plane.db.engine import libpq_url
    from openlora.base_model import BaseModelSpec
    from openlora.v1 import worker_pb2, worker_pb2_grpc
    from openlora.wire import spec_to_proto
    from tests.worker.conftest import WORKER_TOKEN

    spec = BaseModelSpec.from_hf_config(
        json.loads((system.model_dir / "config.json").read_text()), base_model
    )
    worker_id = f"wide-{uuid.uuid4().hex[:8]}"
    with grpc.insecure_channel(system.control_plane.target) as channel:
        worker_pb2_grpc.WorkerServiceStub(channel).RegisterWorker(
            worker_pb2.RegisterWorkerRequest(
                worker_id=worker_id, address="127.0.0.1:9", base_model=spec_to_proto(spec),
                max_lora_rank=max_lora_rank, num_adapter_slots=8,
            ),
            metadata=(("authorization", f"Bearer {WORKER_TOKEN}"),),
        )  # fmt: skip
    try:
        yield
    finally:
        with psycopg.connect(libpq_url(system.control_plane.app.config.database_url)) as conn:
            conn.execute(
                "UPDATE worker SET last_heartbeat_at = now() - interval '1 day' WHERE id = %s", (worker_id,)
            )


@pytest.mark.parametrize("big_first", [False, True])
def test_a_member_this_worker_refuses_is_named_by_its_place_in_the_request(system, tmp_path, big_first):
    """The builder counted members in the spec's sorted order: the refusal named mix[0] whichever place
    the member had in the request."""
    from tests.engine.reference import write_peft_adapter
    from tests.worker.conftest import BASE_MODEL

    tenant, _, key = system.new_tenant()
    big = write_peft_adapter(system.model_dir, tmp_path / "big", 3, r=32, target_modules=["q_proj"])
    with _wider_worker_registered(system, BASE_MODEL, max_lora_rank=64):  # the upload limit is the fleet's
        system.admin.push(big, "big", tenant, BASE_MODEL)  # rank 32: above this worker's 16
    mix = [("big", 0.5), ("ad0", 0.5)] if big_first else [("ad0", 0.5), ("big", 0.5)]
    with pytest.raises(grpc.RpcError) as refused:
        _generate(system.target, key, _request(mix, inference_pb2.MIX_METHOD_TIES, density=0.5))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"mix[{0 if big_first else 1}]" in refused.value.details()


def test_a_merge_of_one_content_under_two_names_names_the_second_member(system, tmp_path):
    """Refused as `mix` "names the same adapter content twice": the field now says which member."""
    tenant, _, key = system.new_tenant(admin=True)
    for name in ("first", "again"):
        system.admin.push(system.model_dir / "adapters" / "ad2", name, tenant, "tiny")
    request = _request([("ad1", 0.3), ("first", 0.4), ("again", 0.3)], inference_pb2.MIX_METHOD_TIES)
    with pytest.raises(grpc.RpcError) as refused:
        _generate(system.target, key, request)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == (
        "mix[2].adapter has the same content as mix[1].adapter (one adapter under two names)"
    )


def _wait(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_merge_damaged_on_the_workers_disk_is_built_again_after_a_failed_load(system):
    """Its weights' header damaged in place with size and times kept (nothing for a `stat` to see), a merge
    the engine must read again from disk fails that load; it was refused (FAILED_PRECONDITION, as if the
    caller's mix were at fault) the same way on every later call until the worker restarted. Now the call
    is told to retry, and the failed load has the merge checked against its digest, removed and built
    again: the next call gets the merge's tokens."""
    tenant, _, key = system.new_tenant()
    mix = [("ad4", 0.5), ("ad6", 0.5)]
    request = _request(mix, inference_pb2.MIX_METHOD_TIES, density=0.5)
    want, _ = _generate(system.target, key, request)
    scope = cache_scope(system.tenant_ids[tenant], private=True)
    merge_key = MergeSpec.of([(system.adapters[n], w) for n, w in mix], "ties", 0.5, scope=scope).key(
        MAX_RANK
    )
    weights = system.worker.config.state_dir / "merges" / merge_key / "adapter_model.safetensors"
    data, stat = bytearray(weights.read_bytes()), weights.stat()
    data[9] = 0xFF  # inside the safetensors header's JSON
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    engine = system.worker.engine
    engine.invalidate(merge_key)  # out of the slots and host memory: the next call reads the disk
    assert _wait(lambda: merge_key not in engine.resident_adapter_keys() + engine.host_adapter_keys())

    with pytest.raises(grpc.RpcError) as failed:
        _generate(system.target, key, request)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE  # the worker's disk, not the caller's mix
    assert "retry" in failed.value.details()
    builds = _count(system, "openlora_merge_build_seconds_count")
    tokens, _ = _generate(system.target, key, request)
    assert tokens == want
    assert _count(system, "openlora_merge_build_seconds_count") == builds + 1
