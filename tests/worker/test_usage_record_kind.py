"""A usage record carries the request's kind and saved mix name through the spool; a line spooled by an
older worker, without them, still reads (kind "": billed per adapter as before)."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from data_plane.server.usage_reporter import UsageRecord, request_kind


def _record(**overrides) -> UsageRecord:
    fields = dict(
        request_id="r1",
        tenant_id="t1",
        adapters=(("a1", 0.6), ("a2", 0.4)),
        worker_id="w1",
        base_model="base",
        prompt_tokens=5,
        completion_tokens=8,
        queue_ms=1.0,
        ttft_ms=2.0,
        total_ms=3.0,
        finished_at=1_700_000_000.5,
        finish_reason="length",
    )
    return UsageRecord(**(fields | overrides))


def test_the_kind_and_mix_name_survive_the_spool_round_trip() -> None:
    record = _record(request_kind="merge:ties", mix_name="blend")
    assert UsageRecord.from_json(record.to_json()) == record


def test_a_line_spooled_without_a_kind_reads_as_kind_unknown() -> None:
    old = json.loads(_record().to_json())
    del old["request_kind"], old["mix_name"]
    record = UsageRecord.from_json(json.dumps(old))
    assert (record.request_kind, record.mix_name) == ("", "")


def test_a_kind_that_is_not_text_is_refused() -> None:
    line = json.loads(_record().to_json()) | {"request_kind": 3}
    with pytest.raises(ValueError, match="text field"):
        UsageRecord.from_json(json.dumps(line))


@pytest.mark.parametrize(
    ("mix_method", "num_adapters", "saved_mix", "kind"),
    [
        ("linear", 0, False, "single"),
        ("linear", 1, False, "single"),
        ("linear", 1, True, "linear_mix"),  # a saved mix of one adapter bills under its own name
        ("linear", 2, False, "linear_mix"),
        ("ties", 2, False, "merge:ties"),
        ("dare_linear", 3, True, "merge:dare_linear"),
        ("magnitude_prune", 1, False, "merge:magnitude_prune"),
        ("ensemble", 2, False, "ensemble"),
    ],
)
def test_request_kind_names_what_the_request_ran(mix_method, num_adapters, saved_mix, kind) -> None:
    assert request_kind(mix_method, num_adapters, saved_mix) == kind


def test_a_spooled_record_is_every_field_of_the_record_and_reads_back_equal():
    record = _record(request_kind="linear_mix", mix_name="blend")
    line = record.to_json()
    assert json.loads(line) == json.loads(json.dumps(asdict(record)))
    assert UsageRecord.from_json(line) == record
