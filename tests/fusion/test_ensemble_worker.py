"""Ensembles through a control plane and a worker in process: served over gRPC, billed for the compute.

An ensemble of K members runs every token K times, so its usage is its prompt and completion tokens times
K; each adapter member's line holds its weighted share of the tokens delivered (its royalty's base), the
base model's line the rest; the base model as a member and members of weight 0 earn no royalty. The
caller's own usage message counts the tokens it received.
"""

from __future__ import annotations

import time
import uuid

import grpc
import pytest

from openlora.admin_client import AdminClient
from openlora.client import build_request
from openlora.v1 import inference_pb2, inference_pb2_grpc
from tests.worker import conftest as worker

tiny_model_dir = worker.tiny_model_dir
ADMIN_KEY, BASE_MODEL = worker.ADMIN_KEY, worker.BASE_MODEL
PROMPT = "the quick brown fox"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def ensemble_system(database_url, redis_url, tiny_model_dir, tmp_path_factory):
    """A control plane and a worker; a tenant with three private adapters (ad0, ad1, ad2).
    Yields (the tenant's admin client, its key, the worker's target)."""
    from control_plane.config import ControlPlaneConfig
    from control_plane.server.server import serve

    loop = worker.support.LoopThread()
    cp = loop.run(
        serve(
            ControlPlaneConfig(
                database_url=database_url,
                state_dir=tmp_path_factory.mktemp("cp-ensemble"),
                worker_token=worker.WORKER_TOKEN,
                listen="127.0.0.1:0",
                redis_url=redis_url,
                admin_key=ADMIN_KEY,
                predictor_interval_s=0,
            )
        )
    )
    running = worker.start_worker(
        loop, cp.target, tiny_model_dir, tmp_path_factory.mktemp("worker-ensemble"), redis_url
    )
    operator = AdminClient(cp.target, ADMIN_KEY)
    tenant = f"ens-{uuid.uuid4().hex[:8]}"
    operator.create_tenant(tenant)
    key = operator.create_api_key(tenant, admin=True).secret
    admin = AdminClient(cp.target, key)
    for name in ("ad0", "ad1", "ad2"):
        admin.upload_adapter(tiny_model_dir / "adapters" / name, name, BASE_MODEL)
    yield admin, key, f"127.0.0.1:{running.port}"
    admin.close()
    operator.close()
    loop.run(running.stop(1.0))
    loop.run(cp.stop(1.0))
    loop.close()


def _generate(
    target: str, key: str, mix=None, combine=None, **kwargs
) -> list[inference_pb2.GenerateResponse]:
    request = build_request(PROMPT, max_tokens=MAX_TOKENS, logprobs=True, **kwargs)
    if mix is not None:
        request.mix.extend(inference_pb2.AdapterWeight(adapter=name, weight=w) for name, w in mix)
        request.mix_method = inference_pb2.MIX_METHOD_ENSEMBLE
    if combine is not None:
        request.combine = combine
    with grpc.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        return list(stub.Generate(request, metadata=[("authorization", f"Bearer {key}")], timeout=60))


def _tokens(responses) -> list[int]:
    return [t for r in responses for t in r.token_ids]


def _usage_rows(admin: AdminClient, adapters: set[str], timeout_s: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        rows = {r.adapter: r for r in admin.get_usage().rows}
        if adapters <= set(rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def test_ensemble_is_served_with_combined_logprobs_and_differs_from_its_members(ensemble_system):
    _, key, target = ensemble_system
    mix = [("ad0", 0.5), ("", 0.5)]
    responses = _generate(target, key, mix=mix, combine=inference_pb2.ENSEMBLE_COMBINE_PROBS)
    tokens = _tokens(responses)
    logprobs = [lp for r in responses for lp in r.logprobs]
    assert len(tokens) == len(logprobs) == MAX_TOKENS
    assert all(lp <= 0 for lp in logprobs)
    last = responses[-1]
    assert (
        last.finish_reason == inference_pb2.FINISH_REASON_LENGTH
        and last.usage.completion_tokens == MAX_TOKENS
    )  # what it received
    assert _tokens(_generate(target, key, mix=mix)) == tokens  # probs is the default combine
    assert tokens != _tokens(_generate(target, key, adapter="ad0"))
    assert tokens != _tokens(_generate(target, key))


def test_ensemble_is_billed_its_tokens_times_k_its_adapters_their_weighted_share_of_the_delivered(
    ensemble_system,
):
    admin, key, target = ensemble_system
    before = {r.adapter: r for r in admin.get_usage().rows}
    assert "ad1" not in before and "ad2" not in before
    responses = _generate(target, key, mix=[("ad1", 0.25), ("ad2", 0.75), ("", 0.0)], request_id="ens-bill")
    assert responses[-1].usage.completion_tokens == MAX_TOKENS
    rows = _usage_rows(admin, {"ad1", "ad2"})
    # K = 3 members ran 8 tokens each: 24 completion tokens billed. The adapters' lines hold their
    # weighted shares of the 8 delivered (0.25 and 0.75: 2 and 6), on which their royalties are paid;
    # the base model's line the other 16 (the weight-0 base member's sequence and the others' work).
    # (The base line also holds other tests' calls: the whole 3x is checked on the invoice's ensemble line
    # in tests/fusion/test_invoice_request_kinds.py.)
    assert rows["ad1"].completion_tokens == 2 and rows["ad2"].completion_tokens == 6
    assert rows["ad1"].requests == rows["ad2"].requests == 1


def test_a_stop_string_ends_the_whole_ensemble(ensemble_system):
    _, key, target = ensemble_system
    mix = [("ad0", 0.4), ("ad1", 0.6)]
    full = "".join(r.text for r in _generate(target, key, mix=mix))
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert len(stop) == 2
    responses = _generate(target, key, mix=mix, stop=[stop])
    text = "".join(r.text for r in responses)
    assert responses[-1].finish_reason == inference_pb2.FINISH_REASON_STOP
    assert stop not in text and full.startswith(text)
    assert len(_tokens(responses)) < MAX_TOKENS


@pytest.mark.parametrize("method", [None, inference_pb2.MIX_METHOD_LINEAR])
def test_a_mix_member_nobody_may_use_is_not_found_naming_its_place(ensemble_system, method):
    """The control plane sees a list of names and answers `adapter: ...`; the worker names the member as
    the request does (as the HTTP API's mix[i].adapter)."""
    _, key, target = ensemble_system
    request = build_request(PROMPT, max_tokens=2)
    request.mix.extend(inference_pb2.AdapterWeight(adapter=n, weight=0.5) for n in ("ad0", "no-such-adapter"))
    if method is not None:
        request.mix_method = method
    with grpc.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(request, metadata=[("authorization", f"Bearer {key}")], timeout=60))
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert refused.value.details() == "mix[1].adapter: 'no-such-adapter' not found"
    request = build_request(PROMPT, max_tokens=2, adapter="no-such-adapter")
    with grpc.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(request, metadata=[("authorization", f"Bearer {key}")], timeout=60))
    assert refused.value.details() == "adapter: 'no-such-adapter' not found"
