import pytest

from benchmarks.cost import estimate_cost, peak_tokens_per_s
from benchmarks.trace import TraceRequest


def _req(arrival_s, adapter, tokens):
    return TraceRequest(
        index=0, arrival_s=arrival_s, adapter=adapter, prompt_token_ids=(20,), max_tokens=tokens
    )


def test_peak_demand_is_the_busiest_window():
    requests = [_req(0.5, "a", 10), _req(1.5, "a", 30), _req(1.9, "b", 50)]
    assert peak_tokens_per_s(requests, window_s=1.0) == 80.0
    assert peak_tokens_per_s(requests, window_s=2.0) == 45.0


def test_each_dedicated_deployment_costs_at_least_one_replica_for_the_whole_trace():
    # 10 requests of 100 tokens over 4 adapters in 10 s: one shared worker handles the 100 tokens/s peak.
    requests = [_req(t, f"lora-{t % 4}", 100) for t in range(10)]
    cost = estimate_cost(
        requests,
        shared_capacity_tokens_per_s=100.0,
        dedicated_capacity_tokens_per_s=100.0,
        window_s=10.0,
        duration_s=10.0,
    )
    assert (cost.shared_replicas, cost.dedicated_replicas) == (1, 4)
    assert cost.total_tokens == 1000
    assert cost.shared_gpu_hours_per_million_tokens == pytest.approx((10 / 3600) / 0.001)
    assert cost.ratio == pytest.approx(4.0)


def test_a_peak_above_capacity_needs_more_shared_replicas():
    requests = [_req(0.0, "a", 300), _req(0.5, "b", 300)]
    cost = estimate_cost(
        requests, shared_capacity_tokens_per_s=250.0, dedicated_capacity_tokens_per_s=400.0, window_s=1.0
    )
    assert cost.shared_replicas == 3  # 600 tokens/s peak over 250 tokens/s
    assert cost.dedicated_replicas == 2  # 300 tokens/s each, under 400


def test_scenario_four_prices_each_configuration_at_its_measured_capacity():
    from benchmarks.run import config_from_args, scenario_cost

    cfg = config_from_args([])
    runs = [
        {"num_adapters": 1, "capacity_rate_per_s": 6.0, "capacity_tokens_per_s": 240.0},
        {"num_adapters": 1000, "capacity_rate_per_s": 5.0, "capacity_tokens_per_s": 200.0},
        {"num_adapters": 50, "capacity_rate_per_s": 0.0, "capacity_tokens_per_s": 0.0},  # none sustained
    ]
    one, many = scenario_cost(cfg, runs)
    assert (one["num_adapters"], many["num_adapters"]) == (1, 1000)
    assert one["dedicated_capacity_from"] == many["dedicated_capacity_from"] == 1
    # Every one of the 1,000 adapters is requested, each needing its own deployment for the whole trace.
    assert many["dedicated_replicas"] == 1000 and many["ratio"] > 100
    assert one["ratio"] == pytest.approx(1.0)
    # The trace arrives at the configuration's capacity for about s4_duration_s (1,000 requests at least).
    assert many["duration_s"] == pytest.approx(1000 / 5.0, rel=0.2)
    assert one["duration_s"] == pytest.approx(cfg.s4_duration_s, rel=0.2)
