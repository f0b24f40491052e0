"""The usage spool: nothing recorded is lost to a crash or an unreachable control plane."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import threading
import time
import uuid
from dataclasses import replace
from functools import partial

import grpc
import pytest

from data_plane.server.usage_reporter import (
    CHECKPOINT_FINISH_REASON,
    COMPACT_MIN_LINES,
    UsageRecord,
    UsageReporter,
)

from .conftest import BASE_MODEL, PUBLISHER, support


def _record(request_id: str, completion_tokens: int = 3, finish_reason: str = "stop") -> UsageRecord:
    return UsageRecord(
        request_id=request_id,
        tenant_id="t1",
        adapters=(("ad1", 1.0),),
        worker_id="w1",
        base_model="demo",
        prompt_tokens=5,
        completion_tokens=completion_tokens,
        queue_ms=1.0,
        ttft_ms=2.0,
        total_ms=3.0,
        finished_at=1_700_000_000.5,
        finish_reason=finish_reason,
    )


class Collector:
    """Stands in for the control plane's ReportUsage: fails while `down`, else records batches."""

    def __init__(self) -> None:
        self.down = False
        self.attempts = 0  # every send, failed ones included
        self.batches: list[list[str]] = []
        # (request id, completion tokens, finish reason) of every record acknowledged
        self.records: list[tuple[str, int, str]] = []

    async def __call__(self, records: list[UsageRecord]) -> None:
        self.attempts += 1
        if self.down:
            raise ConnectionError("control plane down")
        self.batches.append([r.request_id for r in records])
        self.records += [(r.request_id, r.completion_tokens, r.finish_reason) for r in records]


async def _until_sent(reporter: UsageReporter, timeout_s: float) -> None:
    """Waits until nothing is pending, or `timeout_s` has passed (the caller asserts what it needs)."""
    deadline = time.monotonic() + timeout_s
    while reporter.num_pending and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


def test_record_round_trips_through_json():
    record = _record("r1")
    assert UsageRecord.from_json(record.to_json()) == record


def test_records_of_a_killed_process_are_sent_after_restart(tmp_path):
    spool = tmp_path / "spool.jsonl"
    collector = Collector()

    async def first_life():
        reporter = UsageReporter(spool, collector)
        reporter.record(_record("r1"))
        reporter.record(_record("r2"))
        # No stop(): the process dies here.

    async def second_life():
        reporter = UsageReporter(spool, collector)
        assert reporter.num_pending == 2
        await reporter.flush()
        await reporter.stop()

    asyncio.run(first_life())
    asyncio.run(second_life())
    assert collector.batches == [["r1", "r2"]]
    assert spool.read_text() == ""


def test_unreachable_control_plane_keeps_records_and_retries(tmp_path):
    spool = tmp_path / "spool.jsonl"
    collector = Collector()
    collector.down = True

    async def scenario():
        reporter = UsageReporter(spool, collector, flush_interval_s=0.05)
        await reporter.start()
        reporter.record(_record("r1"))
        await asyncio.sleep(0.2)
        assert reporter.num_pending == 1
        assert [json.loads(line)["request_id"] for line in spool.read_text().splitlines()] == ["r1"]
        collector.down = False
        await _until_sent(reporter, 5.0)
        await reporter.stop()
        return reporter.stats.failures

    failures = asyncio.run(scenario())
    assert failures >= 1
    assert collector.batches == [["r1"]]
    assert spool.read_text() == ""


@pytest.fixture
def spool_rewrites(monkeypatch) -> list[int]:
    """The pending count at each rewrite of the spool (`_compact`), in order."""
    rewrites: list[int] = []
    original = UsageReporter._compact

    def counting_compact(self):
        rewrites.append(len(self._pending))
        original(self)

    monkeypatch.setattr(UsageReporter, "_compact", counting_compact)
    return rewrites


def test_records_finishing_during_an_outage_add_no_send_attempts_or_spool_rewrites(tmp_path, spool_rewrites):
    """Past a full batch pending, every record finished while the control plane was away woke the send
    loop: one failed ReportUsage, one WARNING line and one rewrite (and fsync) of the whole spool on the
    event loop per finished request, whatever the backoff said. Retries now come once per flush interval,
    and a failed attempt that settled nothing leaves the spool as it is."""
    collector = Collector()
    collector.down = True
    rewrites = spool_rewrites

    async def scenario():
        reporter = UsageReporter(tmp_path / "spool.jsonl", collector, flush_interval_s=0.2, batch_size=5)
        rewrites.clear()  # the one every start makes
        await reporter.start()
        for i in range(60):  # 60 records over about 0.6 s: three flush intervals
            reporter.record(_record(f"r{i}"))
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        attempts, rewrites_while_down = collector.attempts, len(rewrites)
        collector.down = False
        await _until_sent(reporter, 2.0)
        await reporter.stop()
        return attempts, rewrites_while_down

    attempts, rewrites_while_down = asyncio.run(scenario())
    assert attempts <= 5  # about one per flush interval; one per record past the fifth before
    assert rewrites_while_down == 0  # one per failed attempt before
    assert sorted(r[0] for r in collector.records) == sorted(f"r{i}" for i in range(60))


def test_usage_reaches_a_control_plane_within_a_flush_interval_of_its_return_after_a_long_outage(tmp_path):
    """A failed send was retried after a backoff that doubled up to 30 s: after an outage of half a
    minute the usage of every call served during it (and after it) reached the control plane up to 30 s
    after it was back, though clients and the worker reconnect within a second. Retries now come every
    flush interval for as long as the outage lasts."""
    collector = Collector()
    collector.down = True

    async def scenario():
        reporter = UsageReporter(tmp_path / "spool.jsonl", collector, flush_interval_s=0.05)
        await reporter.start()
        reporter.record(_record("r1"))
        await asyncio.sleep(1.6)  # the old backoff: 0.1, 0.2, 0.4, 0.8, then 1.6 s
        collector.down = False
        back = time.monotonic()
        while reporter.num_pending and time.monotonic() - back < 5:
            await asyncio.sleep(0.01)
        delay_s = time.monotonic() - back
        await reporter.stop()
        return delay_s

    delay_s = asyncio.run(scenario())
    assert collector.batches == [["r1"]]
    assert delay_s < 0.3


def test_torn_last_line_is_skipped_and_does_not_swallow_the_next_record(tmp_path):
    spool = tmp_path / "spool.jsonl"
    spool.write_text(_record("r1").to_json() + "\n" + _record("r2").to_json()[:20])
    collector = Collector()

    async def scenario():
        reporter = UsageReporter(spool, collector)
        reporter.record(_record("r3"))
        await reporter.flush()
        await reporter.stop()

    asyncio.run(scenario())
    assert collector.batches == [["r1", "r3"]]


@contextlib.contextmanager
def _file_size_limit(limit_bytes: int):
    """No file of this process may grow past `limit_bytes` meanwhile: a write beyond it fails with EFBIG
    (after writing what fits), as one fails on a full disk (ENOSPC)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_a_record_the_spool_refused_never_reaches_it_later(tmp_path):
    """A write the file system refuses (disk full) raises, and the caller acts on it: a refused first
    chunk is never handed over and never billed (generation.py). Its line must not land in the spool once
    space is back: it stayed in the file's buffer and went out with the next record, so a crash before
    the next compaction billed a call the client saw refused, with no token delivered."""
    spool = tmp_path / "spool.jsonl"
    collector = Collector()

    async def first_life():
        reporter = UsageReporter(spool, collector)
        reporter.record(_record("before"))
        refused = reporter.track(lambda: _record("refused", 1, CHECKPOINT_FINISH_REASON))
        with _file_size_limit(spool.stat().st_size + 10), pytest.raises(OSError):
            reporter.checkpoint((refused,))
        reporter.untrack(refused)
        reporter.record(_record("after"))
        # No stop(): the process dies here.

    async def second_life():
        reporter = UsageReporter(spool, collector)
        await reporter.flush()
        await reporter.stop()

    asyncio.run(first_life())
    asyncio.run(second_life())
    assert sorted(collector.records) == [("after", 3, "stop"), ("before", 3, "stop")]


def test_a_checkpoint_the_spool_refused_is_written_by_the_next_one_though_the_stream_did_not_move(tmp_path):
    """A running stream's count that the full disk refused is spooled by the next checkpoint once space is
    back, even when the stream delivered nothing since (a slow reader): it was marked spooled when the
    write failed, so a crash lost what it had delivered until it moved again."""
    spool = tmp_path / "spool.jsonl"
    collector = Collector()
    stream = Stream("long")

    async def first_life():
        reporter = UsageReporter(spool, collector)
        reporter.track(stream.read)
        stream.delivered = 40
        with _file_size_limit(spool.stat().st_size + 10), pytest.raises(OSError):
            reporter.checkpoint()
        assert reporter.checkpoint() == 1
        # No stop(): the process is killed here.

    async def second_life():
        reporter = UsageReporter(spool, collector)
        await reporter.flush()
        await reporter.stop()

    asyncio.run(first_life())
    asyncio.run(second_life())
    assert collector.records == [("long", 40, CHECKPOINT_FINISH_REASON)]


def test_batches_are_bounded(tmp_path):
    collector = Collector()

    async def scenario():
        reporter = UsageReporter(tmp_path / "spool.jsonl", collector, batch_size=2)
        for i in range(5):
            reporter.record(_record(f"r{i}"))
        await reporter.flush()
        await reporter.stop()

    asyncio.run(scenario())
    assert [len(b) for b in collector.batches] == [2, 2, 1]


def test_acknowledged_keys_are_remembered_up_to_a_bound(tmp_path, monkeypatch):
    """The worker answers for ids whose usage the control plane acknowledged (the last MAX_SETTLED_KEYS),
    so that they are refused while it cannot be asked."""
    from data_plane.server import usage_reporter

    monkeypatch.setattr(usage_reporter, "MAX_SETTLED_KEYS", 3)
    collector = Collector()

    async def scenario():
        reporter = UsageReporter(tmp_path / "spool.jsonl", collector, batch_size=2)
        reporter.record(_record("r0"))
        assert reporter.has_recorded("t1", "r0") and reporter.has_pending("t1", "r0")  # spooled
        for i in range(1, 5):
            reporter.record(_record(f"r{i}"))
        await reporter.flush()
        await reporter.stop()
        return reporter

    reporter = asyncio.run(scenario())
    assert reporter.num_pending == 0
    assert [reporter.has_recorded("t1", f"r{i}") for i in range(5)] == [False, False, True, True, True]
    assert not reporter.has_recorded("t2", "r4")  # keyed by tenant


def test_acknowledged_keys_survive_a_restart_within_the_bound(tmp_path, monkeypatch):
    """A restarted worker still answers for the ids it had billed (the settled-keys file beside the
    spool): a worker killed and started again while the control plane is away must not serve them again
    for free. The bound holds across starts, a torn last line costs only itself, and the file is rewritten
    (not grown without end) once it holds twice the bound."""
    from data_plane.server import usage_reporter

    monkeypatch.setattr(usage_reporter, "MAX_SETTLED_KEYS", 3)
    collector = Collector()
    spool = tmp_path / "spool.jsonl"

    async def run(ids):
        reporter = UsageReporter(spool, collector, batch_size=2)
        for request_id in ids:
            reporter.record(_record(request_id))
        await reporter.flush()
        await reporter.stop()
        return reporter

    asyncio.run(run(["r0", "r1"]))
    restarted = asyncio.run(run([]))
    assert restarted.has_recorded("t1", "r0") and restarted.has_recorded("t1", "r1")
    assert not restarted.has_recorded("t2", "r0")

    settled = spool.with_name("spool.settled.jsonl")
    with open(settled, "a", encoding="utf-8") as f:
        f.write('["t1","r')  # a kill mid-write
    asyncio.run(run(["r2", "r3", "r4"]))
    restarted = asyncio.run(run([]))
    assert [restarted.has_recorded("t1", f"r{i}") for i in range(5)] == [False, False, True, True, True]
    assert len(settled.read_text().splitlines()) <= 2 * 3

    for i in range(5, 12):
        asyncio.run(run([f"r{i}"]))
    assert len(settled.read_text().splitlines()) <= 2 * 3
    restarted = asyncio.run(run([]))
    assert [restarted.has_recorded("t1", f"r{i}") for i in range(12)] == [False] * 9 + [True] * 3


def test_an_unwritable_settled_file_does_not_stop_settling(tmp_path):
    """The settled-keys file is a memory across restarts, not part of the usage record: when it cannot be
    written, records are still acknowledged and dropped from the spool, and the keys kept in memory."""
    collector = Collector()
    spool = tmp_path / "spool.jsonl"
    spool.with_name("spool.settled.jsonl").mkdir()  # a directory where the file should be

    async def scenario():
        reporter = UsageReporter(spool, collector, batch_size=2)
        reporter.record(_record("r0"))
        await reporter.flush()
        await reporter.stop()
        return reporter

    reporter = asyncio.run(scenario())
    assert reporter.num_pending == 0 and reporter.has_recorded("t1", "r0")
    assert collector.batches == [["r0"]]


def test_a_catch_up_rewrites_the_spool_a_bounded_number_of_lines(tmp_path, spool_rewrites):
    """After an outage the spool was rewritten (and fsynced, on the event loop) after every batch: N
    records rewrote about N^2 / (2 x batch) lines, 60,000 records blocked the worker's streams for over a
    minute. The rewrites now add up to at most 2N lines; everything is still sent once, and the spool
    ends empty."""
    collector = Collector()
    written = spool_rewrites
    count = 2000

    async def scenario():
        reporter = UsageReporter(tmp_path / "spool.jsonl", collector, batch_size=50)
        for i in range(count):
            reporter.record(_record(f"r{i}"))
        written.clear()
        await reporter.flush()
        await reporter.stop()

    asyncio.run(scenario())
    assert sorted(r[0] for r in collector.records) == sorted(f"r{i}" for i in range(count))
    assert sum(written) <= 2 * count  # the old schedule: 39,000 here
    assert written[-1] == 0  # the last rewrite left the spool empty


def test_stop_with_control_plane_down_leaves_records_in_the_spool(tmp_path):
    spool = tmp_path / "spool.jsonl"
    collector = Collector()
    collector.down = True

    async def scenario():
        reporter = UsageReporter(spool, collector)
        reporter.record(_record("r1"))
        await reporter.stop(flush_timeout_s=0.5)

    asyncio.run(scenario())
    assert [json.loads(line)["request_id"] for line in spool.read_text().splitlines()] == ["r1"]
    assert collector.batches == []


# -- checkpoints of running streams ---------------------------------------------------------------------


class Stream:
    """A running stream's progress as the servicer keeps it: a count the checkpoint reads."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.delivered = 0

    def read(self) -> UsageRecord | None:
        if not self.delivered:
            return None
        return replace(_record(self.request_id, self.delivered), finish_reason=CHECKPOINT_FINISH_REASON)


def _spooled(spool) -> list[tuple[str, int, str]]:
    return [
        (r["request_id"], r["completion_tokens"], r["finish_reason"])
        for r in map(json.loads, spool.read_text().splitlines())
    ]


def test_a_running_streams_count_is_checkpointed_and_sent_only_after_a_crash(tmp_path):
    spool = tmp_path / "spool.jsonl"
    collector = Collector()
    stream = Stream("long")

    async def first_life():
        reporter = UsageReporter(spool, collector, flush_interval_s=0.05, checkpoint_interval_s=0.05)
        await reporter.start()
        reporter.track(stream.read)
        for _ in range(6):
            stream.delivered += 10
            await asyncio.sleep(0.12)
        # While the stream runs, its count is in the spool, never sent.
        assert collector.batches == []
        assert reporter.stats.checkpoints >= 3
        assert ("long", 60, CHECKPOINT_FINISH_REASON) in _spooled(spool)
        # No stop(): the process is killed here (its tasks die with the loop).

    async def second_life():
        reporter = UsageReporter(spool, collector)
        await reporter.flush()
        await reporter.stop()

    asyncio.run(first_life())
    asyncio.run(second_life())
    assert collector.batches == [["long"]]
    assert collector.records == [("long", 60, CHECKPOINT_FINISH_REASON)]
    assert spool.read_text() == ""


def test_the_final_record_supersedes_its_streams_checkpoints(tmp_path):
    spool = tmp_path / "spool.jsonl"
    collector = Collector()
    stream = Stream("s1")

    async def scenario():
        reporter = UsageReporter(spool, collector)
        live = reporter.track(stream.read)
        for delivered in (5, 9):
            stream.delivered = delivered
            assert reporter.checkpoint() == 1
        reporter.record(_record("s1", 12))
        reporter.untrack(live)
        assert [count for _, count, _ in _spooled(spool)] == [5, 9, 12]
        await reporter.flush()
        await reporter.stop()

    asyncio.run(scenario())
    assert collector.records == [("s1", 12, "stop")]
    assert spool.read_text() == ""


def test_a_checkpoint_spools_only_the_streams_that_moved(tmp_path):
    spool = tmp_path / "spool.jsonl"
    moving, idle, silent = Stream("moving"), Stream("idle"), Stream("silent")

    async def scenario():
        reporter = UsageReporter(spool, Collector())
        for stream in (moving, idle, silent):
            reporter.track(stream.read)
        moving.delivered = idle.delivered = 3
        assert reporter.checkpoint() == 2  # "silent" delivered nothing: nothing to bill
        assert reporter.checkpoint() == 0
        moving.delivered = 4
        assert reporter.checkpoint() == 1

    asyncio.run(scenario())
    assert _spooled(spool) == [
        ("moving", 3, CHECKPOINT_FINISH_REASON),
        ("idle", 3, CHECKPOINT_FINISH_REASON),
        ("moving", 4, CHECKPOINT_FINISH_REASON),
    ]


def test_compaction_keeps_only_the_newest_record_of_each_key(tmp_path):
    spool = tmp_path / "spool.jsonl"
    checkpoint = partial(_record, finish_reason=CHECKPOINT_FINISH_REASON)
    lines = [
        checkpoint("a", 4),
        checkpoint("b", 7),
        checkpoint("a", 9),
        _record("a", 11),  # a's final
        checkpoint("b", 8),
        checkpoint("a", 11),  # ranks below a's final with the same count
        _record("c", 2),
    ]
    spool.write_text("".join(r.to_json() + "\n" for r in lines))

    async def scenario():
        reporter = UsageReporter(spool, Collector())
        assert reporter.num_pending == 3
        await reporter.stop(flush_timeout_s=0)

    asyncio.run(scenario())
    assert sorted(_spooled(spool)) == [
        ("a", 11, "stop"),
        ("b", 8, CHECKPOINT_FINISH_REASON),
        ("c", 2, "stop"),
    ]


def test_checkpoints_of_a_long_stream_do_not_grow_the_spool_without_bound(tmp_path):
    spool = tmp_path / "spool.jsonl"
    stream = Stream("endless")

    async def scenario():
        reporter = UsageReporter(spool, Collector())
        reporter.track(stream.read)
        for _ in range(3 * COMPACT_MIN_LINES):
            stream.delivered += 1
            reporter.checkpoint()
        return reporter

    asyncio.run(scenario())
    spooled = _spooled(spool)
    assert len(spooled) <= COMPACT_MIN_LINES + 1
    assert spooled[-1] == ("endless", 3 * COMPACT_MIN_LINES, CHECKPOINT_FINISH_REASON)


def test_stop_spools_a_last_checkpoint_of_streams_still_running(tmp_path):
    spool = tmp_path / "spool.jsonl"
    collector = Collector()
    collector.down = True
    stream = Stream("cut")

    async def scenario():
        reporter = UsageReporter(spool, collector, checkpoint_interval_s=60)
        await reporter.start()
        reporter.track(stream.read)
        stream.delivered = 21
        await reporter.stop(flush_timeout_s=0.2)

    asyncio.run(scenario())
    assert _spooled(spool) == [("cut", 21, CHECKPOINT_FINISH_REASON)]


# -- records the control plane refuses -------------------------------------------------------------------


def _billable(request_id: str, tenant_id: str, adapter_id: str, completion_tokens: int) -> UsageRecord:
    return replace(
        _record(request_id, completion_tokens),
        tenant_id=tenant_id,
        adapters=((adapter_id, 1.0),),
        base_model=BASE_MODEL,
        finished_at=time.time(),
    )


def _adapter_id(system, name: str) -> str:
    from openlora.v1 import admin_pb2

    request = admin_pb2.GetAdapterRequest(name=name, tenant=PUBLISHER)
    return system.admin.stub.GetAdapter(request, metadata=system.admin.metadata).adapter.id


def test_a_poisoned_record_is_dead_lettered_and_the_rest_of_the_spool_flows(system, tmp_path):
    from data_plane.server.metrics import WorkerMetrics

    tenant = f"t{uuid.uuid4().hex[:10]}"
    tenant_id = system.admin.create_tenant(tenant)
    adapter_id = _adapter_id(system, "ad0")
    good = [_billable(f"good-{i}", tenant_id, adapter_id, 10 + i) for i in range(9)]
    # Billed to an adapter the control plane does not know (deleted since): refused as INVALID_ARGUMENT.
    poisoned = _billable("poisoned", tenant_id, str(uuid.uuid4()), 99)
    spool = tmp_path / "spool.jsonl"
    spool.write_text("".join(r.to_json() + "\n" for r in [*good[:4], poisoned, *good[4:]]))
    dead_letter = tmp_path / "dead.jsonl"
    metrics = WorkerMetrics()
    acknowledged: list[str] = []

    async def send(records):  # the worker's real client; notes what the control plane acknowledged
        await system.worker.control_plane.report_usage(records)
        acknowledged.extend(r.request_id for r in records)

    async def scenario():
        reporter = UsageReporter(
            spool,
            send,
            batch_size=4,
            dead_letter_path=dead_letter,
            on_dead_letter=metrics.usage_dead_letter.inc,
        )
        await reporter.start()  # its send loop flushes beside the two flushes asked for here
        await asyncio.gather(reporter.flush(), reporter.flush())
        await reporter.stop()

    system.loop.run(scenario())
    assert sorted(acknowledged) == sorted(r.request_id for r in good)  # each exactly once
    assert spool.read_text() == ""
    [entry] = [json.loads(line) for line in dead_letter.read_text().splitlines()]
    assert entry["code"] == "INVALID_ARGUMENT"
    assert UsageRecord.from_json(json.dumps(entry["record"])) == poisoned
    assert metrics.registry.get_sample_value("openlora_usage_dead_letter_total") == 1
    usage = system.wait_usage(tenant, len(good))
    assert (usage.total_requests, usage.total_completion_tokens) == (
        9,
        sum(r.completion_tokens for r in good),
    )


def test_the_worker_dead_letters_beside_its_spool_and_counts_it(system):
    worker = system.worker
    tenant = f"t{uuid.uuid4().hex[:10]}"
    tenant_id = system.admin.create_tenant(tenant)
    before = worker.metrics.registry.get_sample_value("openlora_usage_dead_letter_total")
    adapter_id = _adapter_id(system, "ad1")

    async def spool():  # on the worker's loop, as the servicer records
        worker.usage.record(_billable("fine", tenant_id, adapter_id, 5))
        worker.usage.record(replace(_billable("bad", tenant_id, "", 5), adapters=(), base_model=""))

    system.loop.run(spool())
    system.flush_usage()
    assert worker.metrics.registry.get_sample_value("openlora_usage_dead_letter_total") == before + 1
    path = worker.config.usage_dead_letter_path
    assert path.parent == worker.config.usage_spool_path.parent
    dead = [json.loads(line)["record"] for line in path.read_text().splitlines()]
    assert ("bad", tenant_id) in {(r["request_id"], r["tenant_id"]) for r in dead}
    assert system.wait_usage(tenant, 1).total_requests == 1


def test_an_unreachable_control_plane_dead_letters_nothing(tmp_path):
    from data_plane.server.control_plane_client import ControlPlaneClient, ControlPlaneError

    spool = tmp_path / "spool.jsonl"
    dead_letter = tmp_path / "dead.jsonl"

    async def scenario():
        client = ControlPlaneClient(f"127.0.0.1:{support.free_port()}", "token")
        reporter = UsageReporter(spool, client.report_usage, dead_letter_path=dead_letter)
        reporter.record(_record("r1"))
        try:
            await reporter.flush()
        except ControlPlaneError as error:
            assert error.code == grpc.StatusCode.UNAVAILABLE
        else:
            raise AssertionError("the flush succeeded with no control plane")
        assert reporter.num_pending == 1
        await reporter.stop(flush_timeout_s=0.5)
        await client.close()

    asyncio.run(scenario())
    assert not dead_letter.exists()
    assert [r for r, _, _ in _spooled(spool)] == ["r1"]


# -- through the worker ----------------------------------------------------------------------------------


def test_running_streams_are_checkpointed_by_the_worker_and_their_finals_bill_once(system):
    from openlora.v1 import inference_pb2, inference_pb2_grpc

    tenant, _, key = system.new_tenant()
    ids = [f"long-{i}-{uuid.uuid4().hex[:8]}" for i in range(6)]
    channel = grpc.insecure_channel(system.target)
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    calls = [
        stub.Generate(
            inference_pb2.GenerateRequest(
                prompt="hello", request_id=request_id, sampling=inference_pb2.SamplingParams(max_tokens=480)
            ),
            metadata=(("authorization", f"Bearer {key}"),),
            timeout=60,
        )
        for request_id in ids
    ]
    received = dict.fromkeys(ids, 0)
    for request_id, call in zip(ids, calls, strict=True):
        for response in call:  # a few tokens of each: all six are streaming now
            received[request_id] += len(response.token_ids)
            if received[request_id] >= 3:
                break

    async def checkpoint_now() -> None:  # on the worker's loop, as its timer does
        system.worker.usage.checkpoint()

    system.loop.run(checkpoint_now())
    spooled: dict[str, int] = {}
    for line in system.worker.config.usage_spool_path.read_text().splitlines():
        record = json.loads(line)
        if record["request_id"] in received:
            assert record["finish_reason"] == CHECKPOINT_FINISH_REASON
            spooled[record["request_id"]] = max(
                spooled.get(record["request_id"], 0), record["completion_tokens"]
            )
    assert set(spooled) == set(ids)
    assert all(1 <= count <= 480 for count in spooled.values())
    # Checkpoints of running streams are not sent: the control plane knows none of them yet.
    assert system.admin.usage(tenant).total_requests == 0

    for request_id, call in zip(ids, calls, strict=True):
        received[request_id] += sum(len(response.token_ids) for response in call)
    channel.close()
    assert set(received.values()) == {480}
    system.flush_usage()
    usage = system.wait_usage(tenant, len(ids))
    assert (usage.total_requests, usage.total_completion_tokens) == (6, 2880)
    assert not any(
        json.loads(line)["request_id"] in received
        for line in system.worker.config.usage_spool_path.read_text().splitlines()
    )


def test_a_spool_that_refuses_writes_answers_the_stream_that_finds_it_unavailable(system):
    """The spool refuses a write with an error other than a full disk (EPERM: an immutable or read-only
    state directory): the stream whose first checkpoint meets it gets UNAVAILABLE, as every later call
    does, not INTERNAL (it got INTERNAL, and a traceback in the worker's log)."""
    import errno

    from openlora.v1 import inference_pb2, inference_pb2_grpc

    _, _, key = system.new_tenant()
    usage = system.worker.usage

    def refuse(text: str) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    usage._write = refuse
    try:
        with grpc.insecure_channel(system.target) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            call = stub.Generate(
                inference_pb2.GenerateRequest(
                    prompt="hello", sampling=inference_pb2.SamplingParams(max_tokens=4)
                ),
                metadata=(("authorization", f"Bearer {key}"),),
                timeout=60,
            )
            with pytest.raises(grpc.RpcError) as info:
                list(call)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
        assert "usage" in info.value.details()
    finally:
        del usage._write
        assert usage.probe_writable()


def test_a_stream_ends_once_the_spool_has_refused_its_checkpoints(system, monkeypatch):
    """While the spool refuses writes (disk full), a running stream's checkpoints fail: what it delivers
    is then held in memory only, and a worker killed meanwhile lost all of it (a review billed 16 of 246
    tokens after 2.5 s). Past MAX_UNSPOOLED_S the stream ends UNAVAILABLE, billed for what it delivered."""
    import errno

    from data_plane.server import usage_reporter
    from openlora.client import Client
    from openlora.errors import OpenLoRAError

    monkeypatch.setattr(usage_reporter, "MAX_UNSPOOLED_S", 0.0)
    tenant, _, key = system.new_tenant()
    usage = system.worker.usage

    def refuse(*args) -> None:  # the spool's appends and the health probe's test write alike
        raise OSError(errno.ENOSPC, "No space left on device")

    async def checkpoint_now() -> None:  # the checkpoint timer's pass, run at once on the worker's loop
        with contextlib.suppress(OSError):
            usage.checkpoint()

    async def probe_now() -> bool:  # on the loop, as the worker's health probe runs (never beside it)
        return usage.probe_writable()

    received, ended = 0, None
    with Client(system.target, key) as client:
        for _ in range(3):  # a stream that finished before the refused checkpoint proves nothing: again
            stream = client.generate_stream(prompt="hello", max_tokens=500)
            received = len(next(stream).token_ids)
            usage._write = usage._write_probe = refuse
            try:
                for _ in range(100):  # until the stream moves past its first chunk (or ends)
                    system.loop.run(checkpoint_now())
                    if usage.write_error is not None or not usage._live:
                        break
                    time.sleep(0.01)
                refused = usage.write_error is not None
                try:
                    for response in stream:
                        received += len(response.token_ids)
                except OpenLoRAError as error:
                    ended = error
            finally:
                del usage._write, usage._write_probe
                assert system.loop.run(probe_now())
            if refused:
                break
    assert refused, "every stream finished before its checkpoint"
    assert ended is not None and ended.code == grpc.StatusCode.UNAVAILABLE, ended
    system.flush_usage()
    billed = system.wait_usage(tenant, 1)
    assert received <= billed.total_completion_tokens < 500
    assert billed.total_completion_tokens - received <= 64  # what sat in transport buffers (see above)


def test_a_probe_whose_file_another_probe_removed_still_finds_the_spool_writable(tmp_path, monkeypatch):
    """Two probes of the spool (the health loop's and another caller's) write and remove one probe file:
    the second to remove it got ENOENT, which marked the spool unwritable, and every call was refused
    UNAVAILABLE "its usage spool: No such file or directory" until the next probe (a CI run saw it)."""
    spool = tmp_path / "spool.jsonl"

    async def probe() -> bool:
        reporter = UsageReporter(spool, Collector())
        fsync = os.fsync

        def fsync_then_the_other_probe_removes_it(fd: int) -> None:
            fsync(fd)
            spool.with_name(spool.name + ".probe").unlink()

        monkeypatch.setattr(os, "fsync", fsync_then_the_other_probe_removes_it)
        try:
            return reporter.probe_writable() and reporter.write_error is None
        finally:
            monkeypatch.setattr(os, "fsync", fsync)

    assert asyncio.run(probe())


def test_a_compaction_the_disk_refused_leaves_no_partial_copy_holding_its_space(tmp_path):
    """A compaction writes the spool afresh beside it, then renames. On a full disk that copy fails part
    way: what it wrote must go with it, or it holds the last free space, every append after it fails,
    and the worker refuses calls (its health probe too finds no room) until a later compaction succeeds."""
    spool = tmp_path / "spool.jsonl"
    collector = Collector()
    collector.down = True

    async def scenario():
        reporter = UsageReporter(spool, collector)
        for i in range(40):
            reporter.record(_record(f"r{i}"))
        with _file_size_limit(4096), pytest.raises(OSError):
            reporter._compact()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["spool.jsonl"]
        reporter.record(_record("after"))
        collector.down = False
        await reporter.flush()
        await reporter.stop()

    asyncio.run(scenario())
    assert sorted(r for r, _, _ in collector.records) == sorted([f"r{i}" for i in range(40)] + ["after"])


def test_a_settled_key_the_disk_refused_part_way_does_not_take_the_next_one_with_it(tmp_path):
    """The file of settled keys (what answers "this request id was served" while the control plane cannot
    be asked) on a full disk: an append cut off part way left a torn line, the next key appended after
    space came back was glued to it, and the next start could read neither."""
    spool = tmp_path / "spool.jsonl"
    settled = tmp_path / "spool.settled.jsonl"

    async def first_life():
        reporter = UsageReporter(spool, Collector())
        reporter._keep_settled([("tenant", "before")])
        with _file_size_limit(settled.stat().st_size + 8):
            reporter._keep_settled([("tenant", "refused-part-way")])  # logged, not raised
        reporter._keep_settled([("tenant", "after")])
        await reporter.stop()

    async def second_life() -> tuple[bool, bool]:
        reporter = UsageReporter(spool, Collector())
        try:
            return reporter.has_recorded("tenant", "before"), reporter.has_recorded("tenant", "after")
        finally:
            await reporter.stop()

    asyncio.run(first_life())
    assert asyncio.run(second_life()) == (True, True)


def test_the_spools_periodic_fsync_never_holds_the_event_loop(tmp_path, monkeypatch):
    """An fsync on a stalled or busy disk takes as long as the disk does; made on the event loop, it froze
    every stream, health check and new call of the worker for that long. The fsync here returns only once
    the event loop showed it kept running meanwhile (or after 10 s)."""
    in_fsync, loop_ran = threading.Event(), threading.Event()
    spool_inode: list[int] = []  # set once the record is in: that file's next fsync stalls
    outcomes: list[bool] = []
    real_fsync = os.fsync

    def stalled_fsync(fd: int) -> None:
        # Only the spool's own fsync stalls, once (a compaction's copy, another file, goes through).
        if spool_inode and os.fstat(fd).st_ino == spool_inode[0] and not outcomes:
            in_fsync.set()
            outcomes.append(loop_ran.wait(10))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", stalled_fsync)

    async def main() -> None:
        reporter = UsageReporter(tmp_path / "spool.jsonl", Collector(), fsync_interval_s=0.01)
        await reporter.start()
        reporter.record(_record("r1"))
        spool_inode.append(os.stat(tmp_path / "spool.jsonl").st_ino)
        while not in_fsync.is_set():
            await asyncio.sleep(0.005)
        reporter.record(_record("r2"))  # the spool takes records while the fsync waits
        loop_ran.set()
        await reporter.flush()
        await reporter.stop()

    asyncio.run(main())
    assert outcomes == [True]
