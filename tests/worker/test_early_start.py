"""A call whose key has a recent answer that is no longer fresh starts on it while Authorize asks again.

An adapter called about once an hour is past any authorisation TTL on every call: without this, each of
its calls waits for a control-plane round trip before anything else starts. Started early, the call's
work overlaps the check, and nothing may come of the old answer: the worker here listens to no hints
(no Redis), so the fresh Authorize is all that stands between a revoked key or a replaced adapter and
the caller.
"""

from __future__ import annotations

import shutil
import time
import uuid

import pytest

from openlora import errors
from openlora.client import Client

from .conftest import AUTH_TTL_S, BASE_MODEL, start_worker

PROMPT = "hello world"


@pytest.fixture
def deaf_worker(system, tmp_path):
    """A worker on the shared control plane that hears no hints: only Authorize tells it of changes."""
    worker = start_worker(system.loop, system.control_plane.target, system.model_dir, tmp_path, None)
    yield worker
    system.loop.run(worker.stop(1.0))


def _early_starts(worker, outcome: str) -> float:
    return worker.metrics.early_start.labels(outcome)._value.get()


def _past_ttl() -> None:
    time.sleep(AUTH_TTL_S + 0.2)  # the cached answer is now recent, not fresh


def _adapter_copy(system, tmp_path, alpha: int):
    src = tmp_path / f"alpha-{alpha}-{uuid.uuid4().hex[:6]}"
    shutil.copytree(system.model_dir / "adapters" / "ad6", src)
    config = src / "adapter_config.json"
    config.write_text(config.read_text().replace('"lora_alpha": 16', f'"lora_alpha": {alpha}'))
    return src


def test_a_call_on_a_recent_answer_is_confirmed_and_served_as_on_a_fresh_one(system, deaf_worker):
    tenant, _, key = system.new_tenant()
    target = f"127.0.0.1:{deaf_worker.port}"
    with Client(target, key) as client:
        fresh = client.complete(PROMPT, adapter="ad6", max_tokens=4)
        _past_ttl()
        early = client.complete(PROMPT, adapter="ad6", max_tokens=4)
    assert early == fresh
    assert _early_starts(deaf_worker, "confirmed") == 1
    assert _early_starts(deaf_worker, "refused") == _early_starts(deaf_worker, "changed") == 0
    system.loop.run(deaf_worker.usage.flush())
    usage = system.wait_usage(tenant, 2)
    assert usage.total_requests == 2  # both billed, once each


def test_a_revoked_key_with_a_recent_answer_gets_nothing_and_is_billed_nothing(system, deaf_worker):
    tenant, key_id, key = system.new_tenant()
    target = f"127.0.0.1:{deaf_worker.port}"
    with Client(target, key) as client:
        assert client.complete(PROMPT, adapter="ad6", max_tokens=4)
        system.admin.revoke_key(key_id)
        _past_ttl()
        with pytest.raises(errors.Unauthenticated):
            list(client.generate_stream(prompt=PROMPT, adapter="ad6", max_tokens=4))
    assert _early_starts(deaf_worker, "refused") == 1
    system.loop.run(deaf_worker.usage.flush())
    time.sleep(0.5)
    assert system.admin.usage(tenant).total_requests == 1  # the first call only


def test_an_adapter_replaced_since_the_recent_answer_is_served_from_its_new_content(
    system, deaf_worker, tmp_path
):
    tenant, _, key = system.new_tenant(admin=True)
    target = f"127.0.0.1:{deaf_worker.port}"
    system.admin.push(_adapter_copy(system, tmp_path, 16), "mine", tenant, BASE_MODEL)
    with Client(target, key) as client:
        old = client.complete(PROMPT, adapter="mine", max_tokens=8)
        system.admin.push(_adapter_copy(system, tmp_path, 2048), "mine", tenant, BASE_MODEL)  # replaced
        _past_ttl()
        replaced = client.complete(PROMPT, adapter="mine", max_tokens=8)
        fresh = client.complete(PROMPT, adapter="mine", max_tokens=8)  # within the TTL: a fresh answer
    assert _early_starts(deaf_worker, "changed") == 1
    assert replaced == fresh != old
