import pytest

from benchmarks.capacity import AdapterSchedule
from benchmarks.run import _trace, config_from_args, s2_step_trace


def test_quick_run_never_rewrites_the_results_file_and_keeps_every_scenario_small():
    cfg = config_from_args(["--quick"])
    assert cfg.quick and not cfg.update_results_md
    assert cfg.scenarios == (1, 2, 3, 4)
    assert cfg.s1_requests < 256 and max(cfg.s2_adapters) < 1000 and cfg.s2_steps <= 3
    assert max(cfg.peer_batch_sizes) <= cfg.s1_requests
    # The search's steps stay short: a few seconds of arrivals, a dozen requests.
    assert cfg.s2_step_s <= 5 and cfg.s2_step_min_requests <= 20


def test_full_run_sizes_follow_the_issues():
    cfg = config_from_args([])
    assert (cfg.s1_requests, cfg.s1_adapters) == (256, 100)
    assert cfg.output_len_range == (16, 64)
    assert cfg.peer_batch_sizes == (8, 16, 32, 64)
    assert cfg.s2_adapters == (1, 1000) and cfg.s2_ttft_p99_bound_ms == 1000.0
    assert (cfg.s3_registered, cfg.s3_touched, cfg.num_adapter_slots) == (10_000, 1000, 32)
    assert cfg.num_full_adapters == 1000
    assert cfg.update_results_md and cfg.results_marker == "benchmarks.run"


def test_flags_shorten_the_run_and_set_the_bound():
    cfg = config_from_args(
        [
            "--quick",
            "--ttft-p99-bound-ms",
            "500",
            "--s2-steps",
            "2",
            "--s2-step-s",
            "1.5",
            "--s2-start-rate",
            "3",
            "--peer-batch-sizes",
            "16,8",
            "--output-len",
            "10,20",
            "--scenarios",
            "2,1",
        ]
    )
    assert cfg.quick and cfg.s2_ttft_p99_bound_ms == 500.0 and cfg.s2_steps == 2
    assert cfg.s2_step_s == 1.5 and cfg.s2_start_rate_per_s == 3.0
    assert cfg.peer_batch_sizes == (16, 8) and cfg.output_len_range == (10, 20)
    assert cfg.scenarios == (1, 2)
    assert config_from_args(["--output-len", "32"]).output_len_range == (32, 32)


def test_bad_flags_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="output_len_range"):
        config_from_args(["--output-len", "64,16"])
    with pytest.raises(ValueError, match="--peer-batch-sizes"):
        config_from_args(["--peer-batch-sizes", "8,big"])
    with pytest.raises(ValueError, match="s2_ttft_p99_bound_ms"):
        config_from_args(["--ttft-p99-bound-ms", "0"])
    with pytest.raises(ValueError, match="s2_steps"):
        config_from_args(["--s2-steps", "0"])


def test_gpu_profile_keeps_its_own_results_section_and_device():
    cfg = config_from_args(["--gpu", "--s2-adapters", "100,1000"])
    assert cfg.device == "cuda" and cfg.shape.dtype == "bfloat16"
    assert cfg.results_marker != config_from_args([]).results_marker
    assert 3 not in cfg.scenarios and cfg.s2_adapters == (100, 1000)
    assert cfg.adapter_spec.dtype == "bfloat16"


def test_scenario_one_trace_draws_each_requests_length_from_16_to_64():
    cfg = config_from_args([])
    trace = _trace(cfg, num_requests=cfg.s1_requests, num_adapters=cfg.s1_adapters, seed=cfg.seed + 1)
    lengths = [r.max_tokens for r in trace.requests]
    assert len(lengths) == 256 and all(16 <= n <= 64 for n in lengths)
    # Drawn per request, not one length for all: most of the 49 values occur, both ends included.
    assert len(set(lengths)) > 40 and min(lengths) == 16 and max(lengths) == 64
    assert trace.config.offline


def test_scenario_two_requests_all_1000_adapters_over_its_search():
    cfg = config_from_args([])
    schedule = AdapterSchedule(1000, cfg.alpha, cfg.s2_steps, seed=cfg.seed + 2)
    rates = [2.0, 2.6, 3.38, 2.96, 3.17]  # any rates: coverage does not depend on them
    traces = [s2_step_trace(cfg, schedule, i, rate) for i, rate in enumerate(rates[: cfg.s2_steps])]
    requested = {r.adapter for t in traces for r in t.requests}
    assert len(requested) == 1000
    for trace in traces:
        assert len(trace.requests) >= cfg.s2_step_min_requests
        assert all(16 <= r.max_tokens <= 64 for r in trace.requests)
        assert len({r.max_tokens for r in trace.requests}) > 40
        assert trace.config.rate_per_s in rates
    # The one-adapter configuration's step has the same lengths as the 1000-adapter one's.
    one = s2_step_trace(cfg, AdapterSchedule(1, cfg.alpha, cfg.s2_steps, seed=cfg.seed + 2), 0, rates[0])
    n = len(one.requests)
    assert [r.max_tokens for r in one.requests] == [r.max_tokens for r in traces[0].requests[:n]]
    assert {r.adapter for r in one.requests} == {"lora-00000"}
