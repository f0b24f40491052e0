"""The control plane started with a prediction interval publishes prewarms from real usage rows, and its
prediction thread is gone after stop."""

from __future__ import annotations

import asyncio
import sys
import threading
import time

import pytest
import redis

from control_plane.config import ControlPlaneConfig
from control_plane.db.engine import make_engine, make_sessionmaker
from control_plane.server.server import serve
from openlora.cli import build_parser
from openlora.config import ControlPlaneSettings
from openlora.hints import HINTS_STREAM, Hint
from tests.tiers.test_prediction import _add_adapter, _add_calls, _clear

support = sys.modules["worker_test_support"]  # loaded by this directory's conftest
WORKER_TOKEN = "worker-token-" + "p" * 24
ADMIN_KEY = "operator-key-" + "p" * 24


@pytest.fixture(scope="module")
def sessions(database_url):
    engine = make_engine(database_url, pool_size=2)
    yield make_sessionmaker(engine)
    engine.dispose()


def test_predictor_interval_flag_and_environment_reach_the_control_plane_config():
    args = build_parser().parse_args(["control-plane", "--predictor-interval-s", "0.5"])
    settings = ControlPlaneSettings.resolve(vars(args), {"OPENLORA_WORKER_TOKEN": WORKER_TOKEN})
    assert settings.to_config("postgresql://x/y", None).predictor_interval_s == 0.5
    args = build_parser().parse_args(["control-plane"])
    from_env = ControlPlaneSettings.resolve(
        vars(args), {"OPENLORA_PREDICTOR_INTERVAL_S": "0", "OPENLORA_WORKER_TOKEN": WORKER_TOKEN}
    )
    assert from_env.to_config("postgresql://x/y", None).predictor_interval_s == 0


def test_control_plane_prewarms_a_periodic_adapter_before_its_next_call(
    database_url, sessions, tmp_path, server_state_dir
):
    _clear(sessions)
    adapter = _add_adapter(sessions, "hourly")
    period_s = 20.0
    now = time.time()
    # Every 20 s until 19 s ago: the next call is due in about a second, inside the 5 s lead time.
    _add_calls(sessions, adapter, [now + 1.0 - i * period_s for i in range(6, 0, -1)])
    server, port = support.start_redis(tmp_path)
    try:
        config = ControlPlaneConfig(
            database_url=database_url,
            state_dir=server_state_dir,
            worker_token=WORKER_TOKEN,
            admin_key=ADMIN_KEY,
            listen="127.0.0.1:0",
            redis_url=f"redis://127.0.0.1:{port}",
            predictor_interval_s=0.1,
        )

        async def run() -> tuple[list[Hint], threading.Thread | None]:
            running = await serve(config)
            client = redis.Redis(port=port)
            hints: list[Hint] = []
            try:
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline and not hints:
                    hints = [
                        h
                        for h in (Hint.from_fields(f) for _, f in client.xrange(HINTS_STREAM))
                        if h.kind == "prewarm" and h.adapter_id == str(adapter.id)
                    ]
                    await asyncio.sleep(0.05)
            finally:
                await running.stop(0.5)
            return hints, running.predictor

        hints, thread = asyncio.run(run())
        assert hints, "no prewarm hint for the periodic adapter"
        assert hints[0].sha256 == adapter.sha256 and abs(hints[0].deadline_at - (now + 1.0)) < 3.0
        assert thread is not None and not thread.is_alive()
        assert "predictor" not in {t.name for t in threading.enumerate()}
    finally:
        server.terminate()
        server.wait()
