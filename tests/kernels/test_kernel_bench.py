"""The kernel benchmark runs end to end on the CPU (Triton interpreter, tiny shapes)."""

import json

from benchmarks import kernel_bench


def test_kernel_bench_dry_run_writes_json_and_a_results_section(tmp_path):
    results_md = tmp_path / "RESULTS.md"
    assert kernel_bench.main(["--dry-run", "--out-dir", str(tmp_path), "--results-md", str(results_md)]) == 0
    report = json.loads((tmp_path / "kernel_bench_dry_run.json").read_text())
    assert report["dry_run"] is True and report["copy_bandwidth_gbps"] >= 0
    paths = {(row["op"], row["path"]) for row in report["rows"]}
    assert {("shrink", "bgmv"), ("expand", "segmented"), ("expand", "auto-checked")} <= paths
    assert all(row["triton_ms"] > 0 and row["baseline_ms"] > 0 for row in report["rows"])
    assert set(report["summary"]) == {
        "decode_min_copy_fraction", "decode_at_bandwidth_target",
        "min_speedup_vs_gather_bmm", "faster_than_baseline_everywhere",
    }  # fmt: skip
    assert "### SGMV kernels" in results_md.read_text()
