"""More concurrent requests than the worker admits: the excess is refused with RESOURCE_EXHAUSTED at once
(before any admitted request finishes, never queued), and every admitted request completes and is billed."""

from __future__ import annotations

import pytest

from openlora import errors
from openlora.v1.inference_pb2 import FINISH_REASON_LENGTH as LENGTH

from .conftest import start_stream

pytestmark = pytest.mark.slow

MAX_NUM_SEQS = 2
MAX_WAITING = 2
NUM_REQUESTS = 12
MAX_TOKENS = 1000


def test_excess_requests_get_resource_exhausted_at_once_and_admitted_ones_complete(fault_system):
    worker = fault_system.spawn_worker(
        "--max-num-seqs", str(MAX_NUM_SEQS), "--max-waiting", str(MAX_WAITING)
    )  # fmt: skip
    tenant, key = fault_system.tenant_with_key()
    streams = [
        start_stream(worker.target, key, prompt="hello", max_tokens=MAX_TOKENS) for _ in range(NUM_REQUESTS)
    ]
    for stream in streams:
        assert stream.done.wait(180), fault_system.logs()

    admitted = [s for s in streams if s.error is None]
    refused = [s for s in streams if s.error is not None]
    assert all(isinstance(s.error, errors.ResourceExhausted) for s in refused), [s.error for s in refused]
    # Waiting holds MAX_WAITING; at most MAX_NUM_SEQS more may already have left it for a running slot.
    assert MAX_WAITING <= len(admitted) <= MAX_WAITING + MAX_NUM_SEQS
    assert all(s.num_tokens == 0 for s in refused)
    assert all((s.num_tokens, s.finish_reason) == (MAX_TOKENS, LENGTH) for s in admitted)
    first_admitted_end = min(s.arrivals[-1][0] for s in admitted)
    assert all(s.error_at < first_admitted_end for s in refused)

    usage = fault_system.wait_usage(tenant, len(admitted))
    assert (usage.total_requests, usage.total_completion_tokens) == (
        len(admitted),
        len(admitted) * MAX_TOKENS,
    )
    assert worker.process.poll() is None
