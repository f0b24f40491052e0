"""Predictor over real Postgres usage rows and a real Redis stream, with a compressed clock."""

from __future__ import annotations

import shutil
import sys
import threading
import time
import uuid
from datetime import UTC, datetime

import pytest
import redis
from sqlalchemy import delete

from control_plane.db.engine import make_engine, make_sessionmaker
from control_plane.hints.publisher import HintPublisher
from control_plane.prediction.demand import PredictorConfig, predict
from control_plane.prediction.predictor import Predictor, run_predictor_loop
from control_plane.registry.models import Adapter
from control_plane.tenancy.models import Tenant
from control_plane.usage.models import UsageEvent, UsageEventAdapter
from control_plane.workers.models import BaseModelRow as BaseModel
from openlora.cache_scope import cache_scope
from openlora.hints import HINTS_STREAM, Hint

support = sys.modules["worker_test_support"]  # loaded by this directory's conftest
CONFIG = PredictorConfig(rate_time_constant_s=60.0, lead_s=2.0, demote_below_per_s=1e-3)
T0 = 1_900_000_000.0  # Unix seconds: the start of the synthetic history


@pytest.fixture(scope="module")
def sessions(database_url):
    engine = make_engine(database_url, pool_size=2)
    yield make_sessionmaker(engine)
    engine.dispose()


def _add_adapter(sessions, name: str) -> Adapter:
    with sessions.begin() as s:
        if s.get(BaseModel, "tiny") is None:
            s.add(
                BaseModel(
                    name="tiny",
                    fingerprint="f" * 64,
                    architecture="llama",
                    hidden_size=64,
                    intermediate_size=128,
                    num_layers=2,
                    num_attention_heads=4,
                    num_key_value_heads=2,
                    head_dim=16,
                    vocab_size=256,
                )
            )
        tenant = Tenant(name=f"t-{uuid.uuid4().hex[:8]}")
        s.add(tenant)
        s.flush()
        adapter = Adapter(
            tenant_id=tenant.id,
            name=name,
            base_model_name="tiny",
            base_model_fingerprint="f" * 64,
            rank=4,
            alpha=8.0,
            target_modules=["q_proj"],
            sha256=uuid.uuid4().hex * 2,
            size_bytes=1000,
        )
        s.add(adapter)
    return adapter


def _add_calls(sessions, adapter: Adapter, times: list[float]) -> None:
    with sessions.begin() as s:
        for t in times:
            request_id = f"r-{uuid.uuid4().hex}"
            s.add(
                UsageEvent(
                    request_id=request_id,
                    tenant_id=adapter.tenant_id,
                    prompt_tokens=1,
                    completion_tokens=1,
                    finished_at=datetime.fromtimestamp(t, UTC),
                )
            )
            s.flush()
            s.add(
                UsageEventAdapter(
                    tenant_id=adapter.tenant_id, request_id=request_id, adapter_id=adapter.id, weight=1
                )
            )


def _clear(sessions) -> None:
    with sessions.begin() as s:
        s.execute(delete(UsageEventAdapter))
        s.execute(delete(UsageEvent))


def test_periodic_adapter_is_prewarmed_shortly_before_its_predicted_call(sessions, redis_url):
    _clear(sessions)
    adapter = _add_adapter(sessions, "hourly")
    hour_s = 30.0  # an "hour" of the compressed clock
    _add_calls(sessions, adapter, [T0 + i * hour_s + (0.5 if i % 2 else -0.5) for i in range(6)])
    last = T0 + 5 * hour_s + 0.5
    publisher = HintPublisher(redis_url)
    predictor = Predictor(sessions, publisher, CONFIG)
    before = redis.Redis.from_url(redis_url).xrevrange(HINTS_STREAM, count=1)
    start_id = before[0][0] if before else "-"
    assert predictor.run_once(last + 10) == []  # mid-period: nothing yet
    sent = predictor.run_once(last + hour_s - 0.5)  # within the lead time of the next call (median gap 31)
    assert [(h.kind, h.adapter_id) for h in sent] == [("prewarm", str(adapter.id))]
    assert sent[0].sha256 == adapter.sha256
    # A private adapter: the hint names its owner's cache scope, the key its requests use on workers.
    assert sent[0].cache_scope == cache_scope(adapter.tenant_id, private=True) != ""
    assert abs(sent[0].deadline_at - (last + hour_s)) < 2.0
    assert predictor.run_once(last + hour_s - 0.2) == []  # not repeated
    entries = redis.Redis.from_url(redis_url).xrange(HINTS_STREAM, min=start_id)
    hints = [Hint.from_fields(f) for _, f in entries if f.get(b"kind") == b"prewarm"]
    assert any(
        h.adapter_id == str(adapter.id) and h.reason == "periodic" and h.cache_scope == sent[0].cache_scope
        for h in hints
    )
    publisher.close()


def test_bursty_adapter_is_prewarmed_while_its_burst_lasts_then_demoted():
    gaps_s = [0.2, 1.0, 0.3, 0.8, 0.1, 0.6, 0.4, 1.2, 0.5]  # irregular: no period to find
    burst = [T0 + sum(gaps_s[:i]) for i in range(len(gaps_s) + 1)]
    during = predict(burst, burst[-1] + 0.4, CONFIG)
    assert during is not None and during.kind == "prewarm" and during.reason == "burst"
    assert predict(burst, burst[-1] + 30, CONFIG) is None  # burst over, rate not yet low
    after = predict(burst, burst[-1] + 600, CONFIG)
    assert after is not None and after.kind == "demote"


def test_irregular_adapter_is_not_taken_for_periodic():
    times = [T0, T0 + 3, T0 + 50, T0 + 52, T0 + 200]
    assert predict(times, T0 + 250, CONFIG) is None or predict(times, T0 + 250, CONFIG).reason != "periodic"


def test_predictor_loop_survives_redis_down_and_resumes_when_it_returns(sessions, tmp_path):
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server binary is required")
    _clear(sessions)
    adapter = _add_adapter(sessions, "bursty")
    server, port = support.start_redis(tmp_path)
    url = f"redis://127.0.0.1:{port}"
    clock_s = [T0 + 100.0]
    stop = threading.Event()
    thread = None
    try:
        server.terminate()  # Redis is down when the loop starts
        server.wait()
        thread = threading.Thread(
            target=run_predictor_loop,
            args=(sessions, url, 0.05, stop, CONFIG, lambda: clock_s[0]),
            daemon=True,
        )
        thread.start()
        _add_calls(sessions, adapter, [T0 + 100 - i * 0.5 for i in range(6)])  # a burst right now
        time.sleep(0.5)
        assert thread.is_alive()  # passes failed to publish; the loop goes on
        server, _ = support.start_redis(tmp_path, port)
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not client.xlen(HINTS_STREAM):
            time.sleep(0.05)
        hints = [Hint.from_fields(f) for _, f in client.xrange(HINTS_STREAM)]
        assert [(h.kind, h.adapter_id) for h in hints][:1] == [("prewarm", str(adapter.id))]
    finally:
        stop.set()
        if thread is not None:
            thread.join(5)
        server.terminate()
        server.wait()
