"""gpu_profile: the device-busy union of intervals, and a smoke run of every case on the CPU."""

from __future__ import annotations

import json

from benchmarks import gpu_profile


def test_busy_time_counts_overlapping_intervals_once():
    assert gpu_profile.busy_us([]) == 0
    assert gpu_profile.busy_us([(0, 10), (5, 15), (20, 25), (21, 22)]) == 20
    assert gpu_profile.busy_us([(30, 40), (0, 10)]) == 20


def test_cases_parse_as_engine_requests_and_adapters():
    assert gpu_profile.parse_cases("bf16:1, int8:32a") == (("bf16", 1, False), ("int8", 32, True))


def test_smoke_run_profiles_every_case(tmp_path):
    out = tmp_path / "profile.json"
    assert (
        gpu_profile.main(
            ["--device", "cpu", "--small", "--steps", "2", "--profiled-steps", "1", "--out", str(out)]
        )
        == 0
    )
    report = json.loads(out.read_text())
    cases = [(c["engine"], c["requests"], c["adapters"]) for c in report["cases"]]
    assert cases == list(gpu_profile.CASES)
    for case in report["cases"]:
        assert case["wall_ms_per_step"] > 0 and case["host_ops"]
        assert case["device_busy_ms_per_step"] == 0 and case["kernel_launches_per_step"] == 0  # no GPU here
