"""The usage spool: nothing recorded is lost to a crash or an unreachable control plane."""

from __future__ import annotations

import asyncio
import json

from data_plane.server.usage_reporter import UsageRecord, UsageReporter


def _record(request_id: str, completion_tokens: int = 3) -> UsageRecord:
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
        finish_reason="stop",
    )


class Collector:
    """Stands in for the control plane's ReportUsage: fails while `down`, else records batches."""

    def __init__(self) -> None:
        self.down = False
        self.batches: list[list[str]] = []

    async def __call__(self, records: list[UsageRecord]) -> None:
        if self.down:
            raise ConnectionError("control plane down")
        self.batches.append([r.request_id for r in records])


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
        for _ in range(100):
            if not reporter.num_pending:
                break
            await asyncio.sleep(0.05)
        await reporter.stop()
        return reporter.stats.failures

    failures = asyncio.run(scenario())
    assert failures >= 1
    assert collector.batches == [["r1"]]
    assert spool.read_text() == ""


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
