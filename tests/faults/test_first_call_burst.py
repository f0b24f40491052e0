"""A burst of first calls: hundreds of concurrent Generate calls at once, each for an adapter the worker
has never loaded (each call authorises at the control plane, fetches its artifact and loads it). Every
call ends OK or refused as retryable (RESOURCE_EXHAUSTED or UNAVAILABLE, with a message), never INTERNAL
and never CANCELLED (the client cancels nothing), and the usage billed is exactly the tokens delivered.

The second case runs the burst with the worker left only a few spare file descriptors (as a default
`ulimit -n` of 1024 leaves it under a real burst of a thousand connections, downloads and adapter loads):
running out of open files is overload, answered UNAVAILABLE, never INTERNAL nor a refusal of the adapter.
"""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

from openlora.v1 import inference_pb2, inference_pb2_grpc

from .conftest import BASE_MODEL, support

pytestmark = pytest.mark.slow

NUM_TENANTS = 4
ADAPTERS_PER_TENANT = 12  # 48 distinct adapters, none loaded before the burst
NUM_CALLS = 240
NUM_CHANNELS = 8
MAX_TOKENS = 4
# File descriptors a starved process may open beyond those it holds when the burst starts.
SPARE_FDS = 10
RETRYABLE = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)


def _distinct_adapter(source: Path, out: Path, seed: int) -> Path:
    """A copy of a fixture adapter whose weights differ (so its sha256 does too)."""
    shutil.copytree(source, out)
    weights_path = out / "adapter_model.safetensors"
    tensors = load_file(weights_path)
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in tensors.items():
        tensors[name] = tensor + 0.01 * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
    save_file(tensors, weights_path)
    return out


def _starve_file_descriptors(pid: int) -> None:
    """Lets process `pid` open only SPARE_FDS more files than it has open now."""
    num_open = len(os.listdir(f"/proc/{pid}/fd"))
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (num_open + SPARE_FDS, num_open + SPARE_FDS))


async def _call(stub, key: str, adapter: str) -> tuple[grpc.StatusCode, str, int]:
    """(final status, its message, tokens received) of one Generate."""
    request = inference_pb2.GenerateRequest(
        prompt="hello",
        adapter=adapter,
        request_id=uuid.uuid4().hex,
        sampling=inference_pb2.SamplingParams(max_tokens=MAX_TOKENS),
    )
    tokens = 0
    try:
        async for response in stub.Generate(request, metadata=(("authorization", f"Bearer {key}"),)):
            tokens += len(response.token_ids)
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or "", tokens
    return grpc.StatusCode.OK, "", tokens


async def _burst(
    target: str, calls: list[tuple[str, str, str]], before: Callable[[], None]
) -> list[tuple[grpc.StatusCode, str, int]]:
    """Runs every call at once; `before()` runs once the connections are up."""
    # Several connections, as several clients would open.
    channels = [grpc.aio.insecure_channel(target) for _ in range(NUM_CHANNELS)]
    try:
        await asyncio.gather(*(channel.channel_ready() for channel in channels))
        before()
        stubs = [inference_pb2_grpc.InferenceServiceStub(channel) for channel in channels]
        return await asyncio.gather(
            *(_call(stubs[i % len(stubs)], key, adapter) for i, (_, key, adapter) in enumerate(calls))
        )
    finally:
        for channel in channels:
            await channel.close()


@pytest.mark.parametrize("starved", [False, True], ids=["plain", "few-file-descriptors"])
def test_a_burst_of_first_calls_ends_ok_or_retryable_and_bills_what_was_delivered(
    fault_system, tmp_path, starved
):
    # Registered first (uploads need its base model); no hints, so nothing is prewarmed before the burst.
    # Four slots for 48 adapters: loads and evictions churn all through the burst.
    worker = fault_system.spawn_worker("--num-adapter-slots", "4", "--max-waiting", "1000", redis=False)
    tenants = [fault_system.tenant_with_key() for _ in range(NUM_TENANTS)]
    adapters: dict[str, list[str]] = {}
    for t, (tenant, _) in enumerate(tenants):
        adapters[tenant] = []
        for i in range(ADAPTERS_PER_TENANT):
            source = (
                fault_system.model_dir / "adapters" / support.ADAPTER_NAMES[i % len(support.ADAPTER_NAMES)]
            )
            directory = _distinct_adapter(source, tmp_path / f"{tenant}-{i}", seed=1000 * t + i)
            fault_system.admin.upload_adapter(directory, f"burst{i}", BASE_MODEL, tenant=tenant)
            adapters[tenant].append(f"burst{i}")
    calls = [
        (tenant, key, adapters[tenant][(n // NUM_TENANTS) % ADAPTERS_PER_TENANT])
        for n in range(NUM_CALLS)
        for tenant, key in [tenants[n % NUM_TENANTS]]
    ]

    def starve() -> None:
        if starved:
            _starve_file_descriptors(worker.process.pid)

    outcomes = asyncio.run(_burst(worker.target, calls, starve))

    codes = Counter(code.name for code, _, _ in outcomes)
    allowed = (grpc.StatusCode.OK, *RETRYABLE)
    unexpected = [(code.name, message) for code, message, _ in outcomes if code not in allowed]
    assert not unexpected, (codes, unexpected[:5], fault_system.logs())
    assert all(message for code, message, _ in outcomes if code in RETRYABLE), codes
    if not starved:  # starved of file descriptors on a loaded machine, every call may be turned away
        assert codes["OK"] > 0, (codes, fault_system.logs())
    assert all(tokens == MAX_TOKENS for code, _, tokens in outcomes if code == grpc.StatusCode.OK)
    assert sum(tokens for code, _, tokens in outcomes if code != grpc.StatusCode.OK) == 0, codes

    # Stopped (its usage flushed) before the bill is read, so a late duplicate would show.
    worker.stop()
    for tenant, _ in tenants:
        delivered = [
            tokens
            for (t, _, _), (code, _, tokens) in zip(calls, outcomes, strict=True)
            if t == tenant and code == grpc.StatusCode.OK
        ]
        usage = fault_system.wait_usage(tenant, len(delivered))
        assert (usage.total_requests, usage.total_completion_tokens) == (len(delivered), sum(delivered)), (
            codes
        )
