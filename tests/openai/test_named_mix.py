"""A saved mix called through the OpenAI-compatible API: `model` = the mix's name."""

from __future__ import annotations

import openai
import pytest

from openlora.admin_client import AdminClient
from openlora.client import Client

PROMPT = "the quick brown fox"


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
