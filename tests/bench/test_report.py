from benchmarks.report import SECTION_BEGIN, SECTION_END, format_table, update_results_md


def test_results_section_is_replaced_and_other_sections_are_kept(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## Kernels\nkernel figures\n")
    update_results_md(path, "## Issue 6\nfirst run")
    update_results_md(path, "## Issue 6\nsecond run")
    path.write_text(path.read_text() + "\n## Engine\nengine figures\n")
    update_results_md(path, "## Issue 6\nthird run")
    text = path.read_text()
    assert text.count(SECTION_BEGIN) == 1 and text.count(SECTION_END) == 1
    assert "third run" in text and "first run" not in text and "second run" not in text
    assert "kernel figures" in text and "engine figures" in text


def test_table_aligns_columns_and_formats_numbers():
    table = format_table(["system", "tokens/s"], [["openlora", 1234.567], ["peft", 3.14159], ["x", None]])
    lines = table.splitlines()
    assert lines[0] == "| system   | tokens/s |"
    assert "1,234.6" in lines[2] and "3.14" in lines[3] and "n/a" in lines[4]
    assert len({len(line) for line in lines}) == 1


def _summary(tokens_per_s, p50=100.0, p99=200.0, errors=0):
    return {
        "requests": 10,
        "distinct_adapters": 3,
        "tokens_per_s": tokens_per_s,
        "ttft_ms": {"p50": p50, "p90": p99, "p99": p99},
        "itl_ms": {"p50": 50.0, "p90": 80.0, "p99": 90.0},
        "errors": errors,
        "by_cache_tier": {},
    }


def _peer(batch_size, tokens_per_s, strategy="batched", num_requests=256):
    return {
        "strategy": strategy,
        "batch_size": batch_size,
        "num_requests": num_requests,
        "tokens_per_s": tokens_per_s,
        "generated_tokens": 100,
        "computed_tokens": 150,
        "adapters_loaded": 3,
        "adapter_load_s": 1.0,
    }


def _capacity_run(num_adapters, steps):
    """steps: (rate, p99 ms); sustained when p99 <= 1000."""
    step_dicts = [
        {"rate_per_s": rate, "sustained": p99 <= 1000, "summary": _summary(rate * 40, p99=p99)}
        for rate, p99 in steps
    ]
    good = [s["rate_per_s"] for s in step_dicts if s["sustained"]]
    bad = [s["rate_per_s"] for s in step_dicts if not s["sustained"]]
    return {
        "num_adapters": num_adapters,
        "capacity_rate_per_s": max(good, default=0.0),
        "capacity_tokens_per_s": max(good, default=0.0) * 40,
        "failed_rate_per_s": min(bad, default=None),
        "bracketed": bool(good and bad),
        "adapters_requested": num_adapters,
        "steps": step_dicts,
    }


def test_table_compares_with_the_peers_best_batch_size_and_gives_the_capacity_ratio():
    from benchmarks.report import summary_rows

    sweep = [_peer(1, 50.0, "sequential", 16), _peer(8, 200.0), _peer(16, 300.0), _peer(32, 280.0)]
    best = dict(sweep[2], passes_tokens_per_s=[300.0, 330.0], tokens_per_s=330.0)
    results = {
        "config": {"s1_requests": 256, "s2_ttft_p99_bound_ms": 1000.0, "num_adapter_slots": 32},
        "s1_openlora": {"summary": _summary(990.0), "passes_tokens_per_s": [950.0, 990.0]},
        "s1_peer_sweep": sweep,
        "s1_peer": best,
        "s2_capacity": [
            _capacity_run(1, [(4.0, 300), (5.2, 600), (6.76, 1500), (5.93, 900)]),
            _capacity_run(1000, [(4.0, 400), (5.2, 1200), (4.56, 800), (4.87, 1100)]),
        ],
    }
    rows = {(row[0], row[1]): row for row in summary_rows(results)}
    # Every size of the sweep is in the table; the best one shows both of its passes.
    assert rows[("1 offline", "PEFT batched, batch 16 (best)")][3] == 330.0
    assert "300.0, 330.0" in rows[("1 offline", "PEFT batched, batch 16 (best)")][7]
    assert rows[("1 offline", "PEFT batched, batch 8")][3] == 200.0
    assert "passes: 950.0, 990.0 tokens/s" in rows[("1 offline", "OpenLoRA")][7]
    assert "(prefix)" in rows[("1 offline", "PEFT sequential, batch 1")][2]
    ratio = rows[("1 offline", "OpenLoRA / PEFT batch 16")]
    assert ratio[3] == 990.0 / 330.0 and ratio[7] == "met"
    one = rows[("2 capacity, p99 <= 1000 ms", "OpenLoRA, 1 adapters")]
    assert one[3] == 5.93 * 40 and one[5] == 900
    capacity_ratio = rows[("2 capacity", "1000 / 1 adapters")]
    assert capacity_ratio[3] == 4.56 / 5.93 and capacity_ratio[7] == "MISSED"


def test_capacity_ratio_is_the_most_adapters_over_the_fewest_in_any_order_of_the_configurations():
    from benchmarks.report import summary_rows

    one = _capacity_run(1, [(4.0, 300), (5.2, 600), (6.76, 1500), (5.93, 900)])
    many = _capacity_run(1000, [(4.0, 400), (5.2, 1200), (4.56, 800), (4.87, 1100)])
    config = {"s1_requests": 256, "s2_ttft_p99_bound_ms": 1000.0, "num_adapter_slots": 32}
    for order in ([one, many], [many, one]):  # --s2-adapters 1,1000 and 1000,1
        rows = {(row[0], row[1]): row for row in summary_rows({"config": config, "s2_capacity": order})}
        ratio = rows[("2 capacity", "1000 / 1 adapters")]
        assert ratio[3] == 4.56 / 5.93 and ratio[7] == "MISSED"


def test_transport_targets_are_not_met_while_requests_of_either_transport_failed():
    from benchmarks.run import transports_table

    def s5(http_offline_errors):
        return {
            "rate_per_s": 3.0,
            "offline": {"grpc": [_summary(200.0)], "http": [_summary(205.0, errors=http_offline_errors)]},
            "paced": {"grpc": [_summary(0.0, p50=60.0)], "http": [_summary(0.0, p50=64.0)]},
            "throughput_ratio_http_to_grpc": 205.0 / 200.0,
            "ttft_p50_ms": {"grpc": 60.0, "http": 64.0},
            "ttft_p50_delta_ms": 4.0,
        }

    clean = transports_table(s5(0))
    assert "(target >= 0.9: met)" in clean and "(target within 10 ms: met)" in clean
    # A third of HTTP's offline requests failed: its throughput and TTFT over the rest look as good.
    failed = transports_table(s5(3))
    assert "(target >= 0.9: NOT met)" in failed and "(target within 10 ms: NOT met)" in failed
    assert "| http | 205.0 | 64.0 | 200.0 | 3 |" in failed


def test_openlora_requests_that_failed_in_scenario_1_miss_its_target():
    from benchmarks.report import summary_rows

    best = dict(_peer(16, 300.0), passes_tokens_per_s=[300.0])
    config = {"s1_requests": 256, "s2_ttft_p99_bound_ms": 1000.0, "num_adapter_slots": 32}
    for errors, verdict in ((12, "MISSED"), (0, "met")):
        results = {
            "config": config,
            "s1_openlora": {"summary": _summary(990.0, errors=errors)},
            "s1_peer": best,
        }
        rows = {(row[0], row[1]): row for row in summary_rows(results)}
        ratio = rows[("1 offline", "OpenLoRA / PEFT batch 16")]
        assert ratio[7] == verdict and ratio[6] == errors


def test_scenario_1_times_openlora_as_often_as_the_peers_best_size_and_keeps_the_better_pass(monkeypatch):
    """The peer's best batch size runs twice and its better pass counts: OpenLoRA's trace runs
    `s1_passes` times, and the better pass's figures (summary and records) are what it is compared by."""
    import benchmarks.run as run
    from benchmarks.run_config import BenchConfig
    from benchmarks.trace import Trace, TraceConfig

    rates = iter([610.0, 740.0, 700.0])
    calls = []

    def fake_load(requests, target, api_key, **kwargs):
        rate = next(rates)
        calls.append(rate)
        return {"summary": _summary(rate), "records": [{"pass_rate": rate}]}

    monkeypatch.setattr(run, "run_load", fake_load)
    monkeypatch.setattr(run, "format_summary", lambda summary: f"{summary['tokens_per_s']} tokens/s")
    system = type("System", (), {"inference_target": "127.0.0.1:1", "api_key": "key"})()
    cfg = BenchConfig(warmup=False, s1_passes=3)
    result = run.scenario_offline(cfg, system, Trace(TraceConfig(num_requests=0, num_adapters=1)))
    assert calls == [610.0, 740.0, 700.0]
    assert result["passes_tokens_per_s"] == [610.0, 740.0, 700.0]
    assert result["summary"]["tokens_per_s"] == 740.0 and result["records"] == [{"pass_rate": 740.0}]
