"""A control plane started from `openlora control-plane` flags predicts with the predictor settings those
flags name: a lead time longer than the default prewarms a periodic adapter that the default would not yet."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from control_plane.db.engine import make_engine, make_sessionmaker
from control_plane.prediction.demand import PredictorConfig
from control_plane.server.server import serve
from openlora.cli import build_parser
from openlora.config import ControlPlaneSettings
from openlora.hints import HINTS_STREAM, Hint
from tests.tiers.test_prediction import _add_adapter, _add_calls, _clear

WORKER_TOKEN = "worker-token-" + "s" * 24
ADMIN_KEY = "operator-key-" + "s" * 24


@pytest.fixture(scope="module")
def sessions(database_url):
    engine = make_engine(database_url, pool_size=2)
    yield make_sessionmaker(engine)
    engine.dispose()


def _prewarms_of(client: redis.Redis, adapter_id: str, start_id: bytes | str) -> list[Hint]:
    hints = (Hint.from_fields(f) for _, f in client.xrange(HINTS_STREAM, min=start_id))
    return [h for h in hints if h.kind == "prewarm" and h.adapter_id == adapter_id]


def test_lead_time_flag_reaches_the_running_predictor(database_url, redis_url, sessions, server_state_dir):
    _clear(sessions)
    adapter = _add_adapter(sessions, "hourly-ish")
    period_s = 100.0
    now = time.time()
    # Every 100 s, the next call due in 40 s: the default lead (20% of the period, 20 s) waits; 60 s does not.
    _add_calls(sessions, adapter, [now + 40.0 - i * period_s for i in range(6, 0, -1)])
    assert PredictorConfig().lead_for(period_s) < 40.0
    args = build_parser().parse_args(
        [
            "control-plane",
            "--listen=127.0.0.1:0",
            "--predictor-interval-s=0.1",
            "--predictor-lead-s=60",
            "--predictor-max-lead-s=120",
        ]
    )
    settings = ControlPlaneSettings.resolve(
        vars(args), {"OPENLORA_WORKER_TOKEN": WORKER_TOKEN, "OPENLORA_STATE_DIR": str(server_state_dir)}
    )
    config = settings.to_config(database_url, redis_url)
    client = redis.Redis.from_url(redis_url)
    last = client.xrevrange(HINTS_STREAM, count=1)
    start_id = last[0][0] if last else "-"

    async def run() -> list[Hint]:
        running = await serve(config)
        hints: list[Hint] = []
        try:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and not hints:
                hints = _prewarms_of(client, str(adapter.id), start_id)
                await asyncio.sleep(0.05)
        finally:
            await running.stop(0.5)
        return hints

    try:
        hints = asyncio.run(run())
    finally:
        client.close()
    assert hints, "no prewarm: the running predictor did not use --predictor-lead-s"
    assert abs(hints[0].deadline_at - (now + 40.0)) < 3.0
