"""SIGSTOP of a worker mid-stream for longer than its request id's reservation: the client's retry under
the same id on another worker is served. Then the paused worker either runs again (SIGCONT: its stream
ends ALREADY_EXISTS before another chunk) or is killed and restarted on its state (its spool holds the
stream's last checkpoint). Either way each of the two answers is billed for the tokens it delivered: the
paused worker's usage must not merge into the other worker's under their shared id (a max of the two,
which left the shorter answer's tokens unbilled)."""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest

from openlora import errors
from openlora.client import Client
from openlora.v1.inference_pb2 import FINISH_REASON_LENGTH as LENGTH

from .conftest import start_stream

pytestmark = pytest.mark.slow

PAUSED_MAX_TOKENS = 4000
RETRY_MAX_TOKENS = 300
MIN_TOKENS_BEFORE_PAUSE = 100
# The workers' request id reservation: the pause outlasts it, and the retry waits it out.
RESERVATION = ("--request-id-reservation-s", "3")


def _spool_drained(spool_path) -> bool:
    return not spool_path.exists() or not spool_path.read_text().strip()


@pytest.mark.parametrize("then", ["continued", "killed and restarted"])
def test_a_stream_paused_past_its_reservation_and_the_retry_elsewhere_are_each_billed_what_they_delivered(
    fault_system, then
):
    state_dir = fault_system.directory / "paused-worker"
    paused = fault_system.spawn_worker(*RESERVATION, state_dir=state_dir)
    other = fault_system.spawn_worker(*RESERVATION)
    tenant, key = fault_system.tenant_with_key()
    request_id = "paused-then-retried"
    stream = start_stream(
        paused.target, key, tenant=tenant, prompt="hello", max_tokens=PAUSED_MAX_TOKENS, request_id=request_id
    )
    deadline = time.monotonic() + 120
    while stream.num_tokens < MIN_TOKENS_BEFORE_PAUSE and time.monotonic() < deadline:
        assert not stream.done.is_set(), stream.error
        time.sleep(0.02)
    os.kill(paused.process.pid, signal.SIGSTOP)
    paused_at = time.monotonic()
    try:
        # The id stays reserved for the paused stream until its reservation lapses (RESERVATION): the
        # retry is refused until then, and served after.
        deadline = time.monotonic() + 120
        while True:
            try:
                with Client(other.target, key) as client:
                    retried = list(
                        client.generate_stream(
                            prompt="hello", max_tokens=RETRY_MAX_TOKENS, request_id=request_id
                        )
                    )
                break
            except errors.OpenLoRAError as error:
                assert error.code == grpc.StatusCode.ALREADY_EXISTS, error
                assert time.monotonic() < deadline, fault_system.logs()
                time.sleep(0.25)
        assert retried[-1].finish_reason == LENGTH
        retried_tokens = sum(len(r.token_ids) for r in retried)
        assert retried_tokens == RETRY_MAX_TOKENS
        fault_system.wait_usage(tenant, 1)  # the retry's usage is recorded before the paused worker runs
    finally:
        if then == "continued":
            os.kill(paused.process.pid, signal.SIGCONT)
        else:
            paused.kill()
    assert stream.done.wait(60), fault_system.logs()
    paused_tokens = stream.num_tokens
    assert MIN_TOKENS_BEFORE_PAUSE <= paused_tokens < PAUSED_MAX_TOKENS
    if then == "continued":
        assert stream.error is not None and stream.error.code == grpc.StatusCode.ALREADY_EXISTS, stream.error
        # Billed what it delivered: the stream's final record.
        least_billed = paused_tokens
    else:
        assert isinstance(stream.error, errors.Unavailable), stream.error
        paused = fault_system.spawn_worker(*RESERVATION, state_dir=state_dir)
        # Billed up to the stream's last checkpoint before the pause: at most its last second is missing.
        least_billed = stream.tokens_before(paused_at - 1.0)

    spool_path = state_dir / "usage_spool.jsonl"
    deadline = time.monotonic() + 60
    while not _spool_drained(spool_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _spool_drained(spool_path), fault_system.logs()
    usage = fault_system.wait_usage(tenant, 2, timeout_s=10)
    assert usage.total_requests == 2, (usage, fault_system.logs())
    assert least_billed <= usage.total_completion_tokens - retried_tokens <= paused_tokens, (
        f"billed {usage.total_completion_tokens}: delivered {paused_tokens} (paused worker) + "
        f"{retried_tokens} (retry)\n{fault_system.logs()}"
    )
    assert paused.process.poll() is None and other.process.poll() is None
