"""Generate with `adapter = NAME` of a saved mix, through a control plane and a worker in process.

The worker serves the request the mix stands for (its members, method and options), so its tokens are
the spelled-out mix's; the mix follows its members (a deleted one makes it NOT_FOUND at once, through the
hint stream, however long the authorisation cache); it is billed as the mix of its members."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from openlora import errors
from openlora.admin_client import AdminClient
from openlora.client import Client
from tests.worker import conftest as worker

# The worker tests' tiny model (a real tokenizer and eight PEFT adapters), as a fixture here too.
tiny_model_dir = worker.tiny_model_dir
ADMIN_KEY, BASE_MODEL = worker.ADMIN_KEY, worker.BASE_MODEL

PROMPT = "the quick brown fox"
LONG_TTL_S = 10.0


@dataclass
class MixSystem:
    admin: AdminClient  # the tenant's
    key: str  # the tenant's (admin and infer)
    target: str  # the worker's
    merges_dir: Path  # the worker's derived adapters, one directory per merge key


@pytest.fixture(scope="module")
def mix_system(database_url, redis_url, tiny_model_dir, tmp_path_factory):
    """A control plane and a hint-listening worker that both cache an answer for 10 s; a tenant with three
    private adapters (ad0, ad1, ad2)."""
    from control_plane.config import ControlPlaneConfig
    from control_plane.server.server import serve

    loop = worker.support.LoopThread()
    cp = loop.run(
        serve(
            ControlPlaneConfig(
                database_url=database_url,
                state_dir=tmp_path_factory.mktemp("cp-mix"),
                worker_token=worker.WORKER_TOKEN,
                listen="127.0.0.1:0",
                redis_url=redis_url,
                admin_key=ADMIN_KEY,
                authorize_cache_ttl_ms=int(LONG_TTL_S * 1000),
                predictor_interval_s=0,
            )
        )
    )
    state_dir = tmp_path_factory.mktemp("worker-mix")
    running = worker.start_worker(
        loop, cp.target, tiny_model_dir, state_dir, redis_url, auth_cache_ttl_s=LONG_TTL_S
    )
    operator = AdminClient(cp.target, ADMIN_KEY)
    tenant = f"mix-{uuid.uuid4().hex[:8]}"
    operator.create_tenant(tenant)
    key = operator.create_api_key(tenant, admin=True).secret
    admin = AdminClient(cp.target, key)
    for name in ("ad0", "ad1", "ad2"):
        admin.upload_adapter(tiny_model_dir / "adapters" / name, name, BASE_MODEL)
    admin.target = cp.target
    yield MixSystem(admin, key, f"127.0.0.1:{running.port}", state_dir / "merges")
    admin.close()
    operator.close()
    loop.run(running.stop(1.0))
    loop.run(cp.stop(1.0))
    loop.close()


def _tokens(target: str, key: str, **kwargs) -> list[int]:
    with Client(target, key) as client:
        return [t for r in client.generate_stream(prompt=PROMPT, max_tokens=8, **kwargs) for t in r.token_ids]


def test_a_saved_linear_mix_serves_the_tokens_of_the_spelled_out_mix(mix_system) -> None:
    admin, key, target = mix_system.admin, mix_system.key, mix_system.target
    admin.create_mix("lin", [("ad0", 0.7), ("ad1", 0.3)])
    spelled = _tokens(target, key, mix=[("ad0", 0.7), ("ad1", 0.3)])
    assert _tokens(target, key, adapter="lin") == spelled
    # The mix, not one of its members alone.
    assert spelled != _tokens(target, key, adapter="ad0")


def test_a_saved_mix_is_billed_as_the_mix_of_its_members(mix_system) -> None:
    admin, key, target = mix_system.admin, mix_system.key, mix_system.target
    admin.create_mix("billed", [("ad2", 0.25), ("ad1", 0.75)])
    _tokens(target, key, adapter="billed", request_id="named-mix-billing")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        rows = {r.adapter: r for r in admin.get_usage().rows}
        if "ad2" in rows:
            break
        time.sleep(0.2)
    assert "billed" not in rows and rows["ad2"].requests == 1
    # Weighted tokens: the completion's 8 tokens split 0.25 / 0.75 between the members.
    assert rows["ad2"].completion_tokens == 2


def test_a_saved_mix_inside_a_requests_own_mix_is_invalid_argument(mix_system) -> None:
    admin, key, target = mix_system.admin, mix_system.key, mix_system.target
    admin.create_mix("inner", [("ad0", 1.0)])
    with pytest.raises(errors.InvalidArgument, match=r"mix\[1\]\.adapter"):
        _tokens(target, key, mix=[("ad1", 0.5), ("inner", 0.5)])
    # One member too: its weight, method and options would be dropped for the saved mix's own (a weight
    # of -1 or an ensemble of it served exactly what `adapter = "inner"` serves).
    for weight, method in ((-1.0, "linear"), (0.5, "ensemble"), (1.0, "dare_linear")):
        with pytest.raises(errors.InvalidArgument, match=r"mix\[0\]\.adapter"):
            _tokens(target, key, mix=[("inner", weight)], mix_method=method)


def test_deleting_a_member_makes_the_mix_not_found_before_the_cache_expires(
    mix_system, tiny_model_dir
) -> None:
    admin, key, target = mix_system.admin, mix_system.key, mix_system.target
    admin.upload_adapter(tiny_model_dir / "adapters" / "ad3", "doomed", BASE_MODEL)
    admin.create_mix("fragile", [("ad0", 0.5), ("doomed", 0.5)])
    assert len(_tokens(target, key, adapter="fragile")) == 8  # now cached for 10 s
    admin.delete_adapter("doomed")
    deadline = time.monotonic() + LONG_TTL_S / 2
    while True:
        try:
            _tokens(target, key, adapter="fragile")
        except errors.NotFound as error:
            assert "doomed" in str(error)
            break
        assert time.monotonic() < deadline, "the worker served a deleted member from its cache"
        time.sleep(0.1)


def test_another_tenants_mix_name_is_not_found(mix_system) -> None:
    admin, target = mix_system.admin, mix_system.target
    admin.create_mix("mine-only", [("ad0", 1.0)])
    stranger = f"stranger-{uuid.uuid4().hex[:8]}"
    with AdminClient(admin.target, ADMIN_KEY) as operator:
        operator.create_tenant(stranger)
        stranger_key = operator.create_api_key(stranger).secret
    with pytest.raises(errors.NotFound):
        _tokens(target, stranger_key, adapter="mine-only")


def _merge_keys(merges_dir: Path) -> set[str]:
    return (
        {p.name for p in merges_dir.iterdir() if p.is_dir() and len(p.name) == 64}
        if merges_dir.is_dir()
        else set()
    )


def test_a_saved_ties_mix_serves_the_spelled_out_merge_and_is_rebuilt_when_a_member_is_replaced(
    mix_system, tiny_model_dir
) -> None:
    admin, key, target = mix_system.admin, mix_system.key, mix_system.target
    admin.upload_adapter(tiny_model_dir / "adapters" / "ad4", "swapped", BASE_MODEL)
    admin.create_mix("tied", [("ad0", 0.6), ("swapped", 0.4)], method="ties", density=0.5)
    spelled = {"mix": [("ad0", 0.6), ("swapped", 0.4)], "mix_method": "ties", "density": 0.5}
    before = _merge_keys(mix_system.merges_dir)
    assert _tokens(target, key, adapter="tied") == _tokens(target, key, **spelled)
    [built] = _merge_keys(mix_system.merges_dir) - before
    # Replaced upstream: the hint names the content it served, and the merge built from it goes.
    admin.upload_adapter(tiny_model_dir / "adapters" / "ad5", "swapped", BASE_MODEL)
    deadline = time.monotonic() + LONG_TTL_S / 2
    while built in _merge_keys(mix_system.merges_dir):
        assert time.monotonic() < deadline, "the merge of the replaced content stayed on the worker"
        time.sleep(0.1)
    # The mix now serves the merge of the new content, as the spelled-out request does.
    assert _tokens(target, key, adapter="tied") == _tokens(target, key, **spelled)
    assert built not in _merge_keys(mix_system.merges_dir)


def test_a_saved_ensemble_with_the_base_model_serves_the_spelled_out_ensemble(mix_system) -> None:
    admin, key, target = mix_system.admin, mix_system.key, mix_system.target
    admin.create_mix("duo", [("", 0.5), ("ad1", 0.5)], method="ensemble", combine="logprobs")
    spelled = {"mix": [("", 0.5), ("ad1", 0.5)], "mix_method": "ensemble", "combine": "logprobs"}
    with Client(target, key) as client:
        named = list(client.generate_stream(prompt=PROMPT, max_tokens=8, adapter="duo", logprobs=True))
        direct = list(client.generate_stream(prompt=PROMPT, max_tokens=8, logprobs=True, **spelled))
    assert [t for r in named for t in r.token_ids] == [t for r in direct for t in r.token_ids]
    assert [p for r in named for p in r.logprobs] == pytest.approx([p for r in direct for p in r.logprobs])
