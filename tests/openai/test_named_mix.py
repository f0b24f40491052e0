"""A saved mix called through the OpenAI-compatible API: `model` = the mix's name."""

from __future__ import annotations

import time

import openai
import pytest

from openlora.admin_client import AdminClient
from openlora.client import Client

PROMPT = "the quick brown fox"
BASE = "tiny"


def test_model_naming_a_saved_mix_serves_the_spelled_out_mix(system, http_worker):
    _, _, key = system.new_tenant(admin=True)
    with AdminClient(system.control_plane.target, key) as admin:
        admin.create_mix("blend", [("ad0", 0.7), ("ad1", 0.3)])
    with Client(http_worker.grpc_target, key) as grpc_client:
        spelled = grpc_client.complete(PROMPT, mix=[("ad0", 0.7), ("ad1", 0.3)], max_tokens=8)
    client = openai.OpenAI(base_url=http_worker.base_url, api_key=key, max_retries=0)
    completion = client.completions.create(model="blend", prompt=PROMPT, max_tokens=8)
    assert completion.choices[0].text == spelled
    assert completion.model == "blend"

    _, _, stranger = system.new_tenant()
    with pytest.raises(openai.NotFoundError):  # another tenant's mix looks like no model at all
        openai.OpenAI(base_url=http_worker.base_url, api_key=stranger, max_retries=0).completions.create(
            model="blend", prompt=PROMPT, max_tokens=2
        )


def test_a_saved_mix_whose_adapter_is_gone_is_a_404_naming_model(system, http_worker):
    """A saved mix whose adapter was deleted answered 404 with param null and code `not_found`, where every
    other model the key may not use is `model_not_found` naming `model` (what OpenAI's clients read)."""
    tenant, _, key = system.new_tenant(admin=True)
    system.admin.push(system.model_dir / "adapters" / "ad2", "own-part", tenant, BASE)
    with AdminClient(system.control_plane.target, key) as admin:
        admin.create_mix("part-gone", [("own-part", 0.5), ("ad1", 0.5)])
        client = openai.OpenAI(base_url=http_worker.base_url, api_key=key, max_retries=0)
        client.completions.create(model="part-gone", prompt=PROMPT, max_tokens=2)  # served while whole
        admin.delete_adapter("own-part")
    error = None
    deadline = time.monotonic() + 30  # the worker drops its answer for the mix on the delete's invalidation
    while error is None and time.monotonic() < deadline:
        try:
            client.completions.create(model="part-gone", prompt=PROMPT, max_tokens=2)
        except openai.NotFoundError as refused:
            error = refused.body
        time.sleep(0.2)
    assert error is not None, "the mix was still served 30 s after its adapter was deleted"
    assert (error["param"], error["code"]) == ("model", "model_not_found")
    assert "part-gone" in error["message"] and "own-part" in error["message"]


def test_a_saved_mix_this_worker_cannot_serve_is_a_400_naming_model(system, http_worker):
    """Its adapters' ranks add up past this worker's --max-lora-rank: the refusal named `mix`, a field the
    body never sent, where the body named the mix in `model`."""
    _, _, key = system.new_tenant(admin=True)
    # Saved while a worker of a wider --max-lora-rank was live, so CreateMix took it.
    with system.wider_worker(max_lora_rank=64), AdminClient(system.control_plane.target, key) as admin:
        admin.create_mix("too-wide", [(f"ad{i}", 1.0) for i in range(8)])
    client = openai.OpenAI(base_url=http_worker.base_url, api_key=key, max_retries=0)
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="too-wide", prompt=PROMPT, max_tokens=2)
    assert refused.value.body["param"] == "model"
    assert "too-wide" in refused.value.body["message"]
