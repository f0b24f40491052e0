from benchmarks.run import config_from_args


def test_quick_run_never_rewrites_the_results_file():
    cfg = config_from_args(["--quick"])
    assert cfg.quick and not cfg.update_results_md
    assert cfg.s1_requests < 256 and cfg.scenarios == (1, 2, 3, 4)


def test_full_run_sizes_follow_the_issue():
    cfg = config_from_args([])
    assert (cfg.s1_requests, cfg.s1_adapters) == (256, 100)
    assert cfg.s2_adapters == (1, 10, 100, 1000)
    assert (cfg.s3_registered, cfg.s3_touched, cfg.num_adapter_slots) == (10_000, 1000, 32)
    assert cfg.num_full_adapters == 1000
    assert cfg.update_results_md and cfg.results_marker == "benchmarks.run"


def test_gpu_profile_keeps_its_own_results_section_and_device():
    cfg = config_from_args(["--gpu", "--s2-adapters", "100,1000"])
    assert cfg.device == "cuda" and cfg.shape.dtype == "bfloat16"
    assert cfg.results_marker != config_from_args([]).results_marker
    assert 3 not in cfg.scenarios and cfg.s2_adapters == (100, 1000)
    assert cfg.adapter_spec.dtype == "bfloat16"
