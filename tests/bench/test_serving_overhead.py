from benchmarks.serving_overhead import _Rows, inclusive_frames, self_frames, summarize


def _engine_pass(tokens_per_s):
    cpu_s = {"this process (load generator)": 8.0}
    return {"tokens": 4096, "seconds": 4096 / tokens_per_s, "tokens_per_s": tokens_per_s, "cpu_s": cpu_s}


def _worker_pass(tokens_per_s, errors):
    summary = {
        "requests": 256, "completed": 256 - errors, "errors": errors,
        "errors_by_code": {"UNAVAILABLE": errors} if errors else {}, "completion_tokens": 4096,
        "duration_s": 4096 / tokens_per_s, "tokens_per_s": tokens_per_s, "requests_per_s": 20.0,
        "ttft_ms": {"p50": 1.0, "p90": 2.0, "p99": 3.0}, "itl_ms": {"p50": 1.0, "p90": 2.0, "p99": 3.0},
        "e2e_ms": {"p50": 1.0, "p90": 2.0, "p99": 3.0}, "by_cache_tier": {},
    }  # fmt: skip
    seconds, cpu_s = summary["duration_s"], {"control plane": 0.5}
    return {
        "tokens": 4096,
        "seconds": seconds,
        "tokens_per_s": tokens_per_s,
        "errors": errors,
        "summary": summary,
        "cpu_s": cpu_s,
    }


def test_the_target_is_met_only_when_every_worker_request_succeeded():
    clean = {"engine": [_engine_pass(460.0), _engine_pass(450.0)], "worker": [_worker_pass(430.0, 0)] * 2}
    assert "target >= 0.9: met" in summarize(clean)
    # Failed requests leave their time to the others: the tokens/s of the rest keeps the same ratio.
    failed = {
        "engine": [_engine_pass(460.0), _engine_pass(450.0)],
        "worker": [_worker_pass(430.0, 0), _worker_pass(425.0, 40)],
    }
    at_four = {**clean, "config": {"stream_interval": 4}}
    assert "target >= 0.9: not read at --stream-interval 4" in summarize(at_four)
    report = summarize(failed)
    assert "target >= 0.9: NOT met" in report and "40 worker requests failed" in report
    assert failed["best"]["worker_failed_requests"] == 40


def test_profile_views_count_innermost_functions_and_each_function_once_a_sample():
    rows = _Rows(
        [
            ("thread (1): main", ["run (a.py:1)", "report (b.py:2)", "execute (c.py:3)"], 6),
            ("thread (1): main", ["run (a.py:1)", "report (b.py:2)", "run (a.py:9)"], 2),
            ("thread (2): other", ["poll (d.py:4)"], 2),
        ]
    )
    assert self_frames(rows) == [("execute", 0.6), ("run", 0.2), ("poll", 0.2)]
    # "run" twice on one stack counts once for that sample
    assert dict(inclusive_frames(rows)) == {"run": 0.8, "report": 0.8, "execute": 0.6, "poll": 0.2}


def test_the_per_pass_ratio_pairs_each_worker_pass_with_the_engine_pass_before_it():
    # The machine slows down in the second pass: both arms do; best against best reads 0.667, each pair 0.9.
    results = {
        "engine": [_engine_pass(600.0), _engine_pass(400.0), _engine_pass(500.0)],
        "worker": [_worker_pass(540.0, 0), _worker_pass(360.0, 0), _worker_pass(450.0, 0)],
    }
    report = summarize(results)
    per_pass = results["per_pass_ratio"]
    assert per_pass["median"] == per_pass["min"] == per_pass["max"] == 0.9
    assert per_pass["ci95"] == [0.9, 0.9]
    assert results["best"]["ratio"] == 540.0 / 600.0
    assert "per pass (each worker pass / the engine pass before it, 3 passes): median 0.900" in report
