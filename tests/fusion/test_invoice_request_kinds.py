"""Invoices show a mix, a merge, an ensemble or a saved mix as one "tokens" line per (request kind, mix),
through a control plane and a worker in process; royalties stay per adapter: on every token of a linear
mix or merge (weights do not dilute them), on the weighted share of an ensemble.

Prices are 1 micro per prompt token and 2 per completion token, and the royalty of the other tenant's
public adapter 1 micro per completion token, so every amount can be told from the tokens the requests
were billed (an ensemble of K members: its tokens times K)."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

import pytest

from openlora.admin_client import AdminClient
from openlora.client import Client
from tests.worker import conftest as worker

tiny_model_dir = worker.tiny_model_dir
ADMIN_KEY, BASE_MODEL = worker.ADMIN_KEY, worker.BASE_MODEL

PROMPT = "the quick brown fox"
MAX_TOKENS = 8
PROMPT_MICROS, COMPLETION_MICROS = 1, 2  # per token
ROYALTY_MICROS = 1  # per completion token


@pytest.fixture(scope="module")
def kinds_system(database_url, redis_url, tiny_model_dir, tmp_path_factory):
    """(operator, control plane target, worker target): a control plane and a worker; the base model priced; a tenant "owner"
    with the public adapter "shared" (royalty 1 micro per completion token)."""
    from control_plane.config import ControlPlaneConfig
    from control_plane.server.server import serve

    loop = worker.support.LoopThread()
    cp = loop.run(
        serve(
            ControlPlaneConfig(
                database_url=database_url,
                state_dir=tmp_path_factory.mktemp("cp-kinds"),
                worker_token=worker.WORKER_TOKEN,
                listen="127.0.0.1:0",
                redis_url=redis_url,
                admin_key=ADMIN_KEY,
                predictor_interval_s=0,
            )
        )
    )
    running = worker.start_worker(
        loop, cp.target, tiny_model_dir, tmp_path_factory.mktemp("worker-kinds"), redis_url
    )
    operator = AdminClient(cp.target, ADMIN_KEY)
    operator.set_price(BASE_MODEL, PROMPT_MICROS * 1_000_000, COMPLETION_MICROS * 1_000_000)
    owner = f"owner-{uuid.uuid4().hex[:8]}"
    operator.create_tenant(owner)
    operator.upload_adapter(
        tiny_model_dir / "adapters" / "ad1",
        "shared",
        BASE_MODEL,
        public=True,
        tenant=owner,
        royalty_micros_per_million_tokens=ROYALTY_MICROS * 1_000_000,
    )
    yield operator, cp.target, f"127.0.0.1:{running.port}"
    operator.close()
    loop.run(running.stop(1.0))
    loop.run(cp.stop(1.0))
    loop.close()


def _generate(target: str, key: str, **kwargs) -> tuple[int, int]:
    """(prompt tokens, completion tokens) the caller received."""
    with Client(target, key) as client:
        last = list(client.generate_stream(prompt=PROMPT, max_tokens=MAX_TOKENS, **kwargs))[-1]
    return last.usage.prompt_tokens, last.usage.completion_tokens


def _invoice_when_billed(admin: AdminClient, completion_tokens: int, timeout_s: float = 20.0):
    """The tenant's invoice of this month once its usage holds `completion_tokens` billed tokens."""
    deadline = time.monotonic() + timeout_s
    while admin.get_usage().total_completion_tokens < completion_tokens:
        assert time.monotonic() < deadline, "the usage never reached the control plane"
        time.sleep(0.2)
    return admin.get_invoice(datetime.now(UTC).strftime("%Y-%m"))


def _tokens_lines(invoice) -> dict[tuple[str, str, str], tuple[int, int, int]]:
    return {
        (line.request_kind, line.mix, line.adapter): (
            line.prompt_tokens,
            line.completion_tokens,
            line.amount_micros,
        )
        for line in invoice.lines
        if line.kind == "tokens"
    }


def _cost(prompt_tokens: int, completion_tokens: int) -> tuple[int, int, int]:
    return (
        prompt_tokens,
        completion_tokens,
        prompt_tokens * PROMPT_MICROS + completion_tokens * COMPLETION_MICROS,
    )


def test_each_mix_kind_is_one_tokens_line_and_royalties_stay_per_adapter(kinds_system, tiny_model_dir):
    operator, cp_target, target = kinds_system
    tenant = f"user-{uuid.uuid4().hex[:8]}"
    operator.create_tenant(tenant)
    key = operator.create_api_key(tenant, admin=True).secret
    with AdminClient(cp_target, key) as admin:
        for name in ("ad0", "ad2"):
            admin.upload_adapter(tiny_model_dir / "adapters" / name, name, BASE_MODEL)
        admin.create_mix("blend", [("shared", 0.6), ("ad2", 0.4)], method="ties", density=0.5)
        admin.create_mix("solo", [("ad2", 0.5)])  # one member: still billed under its own name

        prompt, completion = _generate(target, key, adapter="ad0")
        assert completion == MAX_TOKENS
        assert _generate(target, key, mix=[("ad0", 0.5), ("shared", 0.5)]) == (prompt, completion)
        assert _generate(target, key, mix=[("ad2", 0.5), ("ad0", 0.5)], mix_method="ties", density=0.5) == (
            prompt,
            completion,
        )
        assert _generate(target, key, mix=[("shared", 0.25), ("ad2", 0.75)], mix_method="ensemble") == (
            prompt,
            completion,
        )
        assert _generate(target, key, adapter="blend") == (prompt, completion)
        assert _generate(target, key, adapter="solo") == (prompt, completion)
        # Billed: five requests of (prompt, completion) and an ensemble of K = 2 (twice its tokens).
        billed_prompt, billed_completion = 7 * prompt, 7 * completion
        invoice = _invoice_when_billed(admin, billed_completion)

    assert _tokens_lines(invoice) == {
        ("single", "", "ad0"): _cost(prompt, completion),
        ("linear_mix", "ad0+shared", ""): _cost(prompt, completion),
        ("merge:ties", "ad0+ad2", ""): _cost(prompt, completion),
        ("ensemble", "ad2+shared", ""): _cost(2 * prompt, 2 * completion),
        ("merge:ties", "blend", ""): _cost(prompt, completion),
        ("linear_mix", "solo", ""): _cost(prompt, completion),
    }
    # No money changes: the tokens lines hold every billed token at the base model's price.
    tokens_lines = [line for line in invoice.lines if line.kind == "tokens"]
    assert sum(line.prompt_tokens for line in tokens_lines) == billed_prompt
    assert sum(line.completion_tokens for line in tokens_lines) == billed_completion
    # The royalty of "shared": every completion token of the linear mix (8) and of the saved mix, a merge
    # (8), whatever its weight there; its weighted share of the ensemble's delivered tokens (0.25 * 8, of
    # the 16 it bills) = 18 completion tokens, one line for the adapter.
    royalties = [line for line in invoice.lines if line.kind != "tokens"]
    assert [(r.kind, r.adapter, r.request_kind, r.mix) for r in royalties] == [
        ("royalty_paid", "shared", "", "")
    ]
    shared_completion_micro_tokens = (
        completion * 1_000_000 + completion * 1_000_000 // 4 + completion * 1_000_000
    )
    assert royalties[0].amount_micros == round(shared_completion_micro_tokens * ROYALTY_MICROS / 1_000_000)
    assert invoice.charges_micros == (
        billed_prompt * PROMPT_MICROS + billed_completion * COMPLETION_MICROS + royalties[0].amount_micros
    )


def test_a_heavy_weighted_partner_does_not_dilute_a_royalty(kinds_system, tiny_model_dir):
    """The hostile tenant's trick: a royalty adapter at weight 1 mixed with its own adapter at weight 1000
    paid the owner a thousandth of the royalty. Every completion token is now paid for, in a linear mix
    and in a merge alike."""
    operator, cp_target, target = kinds_system
    tenant = f"diluter-{uuid.uuid4().hex[:8]}"
    operator.create_tenant(tenant)
    key = operator.create_api_key(tenant, admin=True).secret
    with AdminClient(cp_target, key) as admin:
        admin.upload_adapter(tiny_model_dir / "adapters" / "ad0", "mine", BASE_MODEL)
        completion = 0
        for method in ("linear", "ties"):
            completion += _generate(target, key, mix={"shared": 1.0, "mine": 1000.0}, mix_method=method)[1]
        invoice = _invoice_when_billed(admin, completion)
    royalties = [line for line in invoice.lines if line.kind == "royalty_paid"]
    assert [(r.adapter, r.completion_tokens) for r in royalties] == [("shared", completion)]
    assert royalties[0].amount_micros == completion * ROYALTY_MICROS


def test_a_record_without_a_kind_bills_per_adapter_as_before(kinds_system, tiny_model_dir):
    """An older worker's record of a mix says no kind: each adapter's tokens line holds its weighted share,
    its request kind is unknown ("")."""
    import grpc

    from openlora.v1 import worker_pb2, worker_pb2_grpc

    operator, cp_target, _ = kinds_system
    tenant = operator.create_tenant(f"old-{uuid.uuid4().hex[:8]}")
    key = operator.create_api_key(tenant.name, admin=True).secret
    with AdminClient(cp_target, key) as admin:
        ids = {}
        for name in ("ad0", "ad2"):
            admin.upload_adapter(tiny_model_dir / "adapters" / name, name, BASE_MODEL)
            ids[name] = admin.get_adapter(name).id
        event = worker_pb2.UsageEvent(
            request_id="older-worker",
            tenant_id=tenant.id,
            adapters=[
                worker_pb2.UsageAdapter(adapter_id=ids["ad0"], weight=0.25),
                worker_pb2.UsageAdapter(adapter_id=ids["ad2"], weight=0.75),
            ],
            worker_id="old",
            base_model=BASE_MODEL,
            prompt_tokens=4,
            completion_tokens=8,
        )
        with grpc.insecure_channel(cp_target) as channel:
            worker_pb2_grpc.WorkerServiceStub(channel).ReportUsage(
                worker_pb2.ReportUsageRequest(events=[event]),
                metadata=[("authorization", f"Bearer {worker.WORKER_TOKEN}")],
            )
        invoice = _invoice_when_billed(admin, 8)
    assert _tokens_lines(invoice) == {("", "", "ad0"): _cost(1, 2), ("", "", "ad2"): _cost(3, 6)}


def test_an_ensemble_pays_royalty_on_its_share_of_all_members_weights_the_base_models_too(
    kinds_system, tiny_model_dir
):
    """An ensemble of a royalty adapter at weight 1 and the base model at weight 3 bills twice its tokens
    (two sequences): the adapter samples a quarter of the tokens delivered and is paid on that quarter (it
    was paid on all the tokens billed, 8x that: the base member's weight was left out of the split and
    the second sequence's tokens counted); the rest is billed as the base model, inside the ensemble's
    line. Beside a member of weight 0 the adapter is paid on every token delivered, not on twice them."""
    operator, cp_target, target = kinds_system
    tenant = f"ens-base-{uuid.uuid4().hex[:8]}"
    operator.create_tenant(tenant)
    key = operator.create_api_key(tenant, admin=True).secret
    with AdminClient(cp_target, key) as admin:
        admin.upload_adapter(tiny_model_dir / "adapters" / "ad0", "idle", BASE_MODEL)
        prompt, completion = _generate(target, key, mix=[("shared", 1.0), ("", 3.0)], mix_method="ensemble")
        invoice = _invoice_when_billed(admin, 2 * completion)
        usage = admin.get_usage()
        assert _tokens_lines(invoice) == {("ensemble", "shared", ""): _cost(2 * prompt, 2 * completion)}
        royalties = [line for line in invoice.lines if line.kind == "royalty_paid"]
        assert [r.adapter for r in royalties] == ["shared"]
        assert royalties[0].amount_micros == round(completion * ROYALTY_MICROS / 4)
        by_adapter = {line.adapter: line.completion_tokens for line in usage.rows}
        assert by_adapter == {"": round(2 * completion * 7 / 8), "shared": round(2 * completion / 8)}

        _generate(target, key, mix=[("shared", 1.0), ("idle", 0.0)], mix_method="ensemble")
        invoice = _invoice_when_billed(admin, 4 * completion)
    royalties = [line for line in invoice.lines if line.kind == "royalty_paid"]
    assert royalties[0].amount_micros == round(completion * ROYALTY_MICROS / 4) + completion * ROYALTY_MICROS


def test_a_share_at_the_billing_rounding_edge_is_billed(kinds_system, tiny_model_dir):
    """A hostile tenant's free ride: weights whose ratio is exactly 5e-7 made the control plane refuse
    the whole usage record (that share rounds to zero at 6 decimal places) after the tokens were
    delivered. The request is billed, and the royalty adapter in it is paid on every token."""
    operator, cp_target, target = kinds_system
    tenant = f"edge-{uuid.uuid4().hex[:8]}"
    operator.create_tenant(tenant)
    key = operator.create_api_key(tenant, admin=True).secret
    with AdminClient(cp_target, key) as admin:
        admin.upload_adapter(tiny_model_dir / "adapters" / "ad0", "mine", BASE_MODEL)
        prompt, completion = _generate(target, key, mix=[("mine", 122.0703125), ("shared", 6.103515625e-05)])
        invoice = _invoice_when_billed(admin, completion)
    assert _tokens_lines(invoice) == {("linear_mix", "mine+shared", ""): _cost(prompt, completion)}
    royalties = [line for line in invoice.lines if line.kind == "royalty_paid"]
    assert [(r.adapter, r.completion_tokens) for r in royalties] == [("shared", completion)]


def test_a_record_with_a_share_that_bills_nothing_is_recorded_without_it(kinds_system, tiny_model_dir):
    """The control plane no longer refuses a whole record for one share it cannot bill (rounding to zero,
    zero, negative, not a number): its tokens go to the record's other shares, nothing is lost."""
    import grpc

    from openlora.v1 import worker_pb2, worker_pb2_grpc

    operator, cp_target, _ = kinds_system
    tenant = operator.create_tenant(f"zero-{uuid.uuid4().hex[:8]}")
    key = operator.create_api_key(tenant.name, admin=True).secret
    with AdminClient(cp_target, key) as admin:
        ids = {}
        for name in ("ad0", "ad2", "ad1"):
            admin.upload_adapter(tiny_model_dir / "adapters" / name, name, BASE_MODEL)
            ids[name] = admin.get_adapter(name).id
        events = [
            worker_pb2.UsageEvent(
                request_id=f"edge-{i}",
                tenant_id=tenant.id,
                adapters=[
                    worker_pb2.UsageAdapter(adapter_id=ids["ad0"], weight=1.0),
                    worker_pb2.UsageAdapter(adapter_id=ids["ad2"], weight=bad),
                ],
                worker_id="w",
                base_model=BASE_MODEL,
                prompt_tokens=2,
                completion_tokens=4,
                request_kind="linear_mix",
            )
            for i, bad in enumerate((4.9e-7, 0.0, -0.5, float("nan")))
        ]
        with grpc.insecure_channel(cp_target) as channel:
            answer = worker_pb2_grpc.WorkerServiceStub(channel).ReportUsage(
                worker_pb2.ReportUsageRequest(events=events),
                metadata=[("authorization", f"Bearer {worker.WORKER_TOKEN}")],
            )
        assert answer.inserted == 4
        usage = admin.get_usage()
    assert (usage.total_requests, usage.total_completion_tokens) == (4, 16)
    assert {line.adapter: line.completion_tokens for line in usage.rows} == {"ad0": 16}
