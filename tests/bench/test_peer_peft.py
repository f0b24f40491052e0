import pytest

from benchmarks import fixtures
from benchmarks.peer_peft import PeerRun, benchmark_peer
from benchmarks.trace import TraceRequest, adapter_name

TINY = fixtures.ModelShape("tiny-peer-llama", 32, 1, 64, 2, 2, 64, max_position_embeddings=128)


@pytest.fixture(scope="module")
def tiny_peer(tmp_path_factory):
    """A tiny random Llama and two PEFT adapters for it (the first written by peft, the second cloned)."""
    root = tmp_path_factory.mktemp("peer-fixtures")
    spec = fixtures.AdapterSpec(rank=4, lora_alpha=8, dtype="float32")
    fixtures.ensure_adapters(2, TINY, spec, root=root)
    return fixtures.model_dir(TINY, root), fixtures.adapters_root(TINY, spec, root)


def _requests(max_tokens: list[int]) -> list[TraceRequest]:
    return [
        TraceRequest(i, 0.0, adapter_name(i % 2) if i % 3 else "", tuple(range(16, 19 + i)), n)
        for i, n in enumerate(max_tokens)
    ]


def test_static_batches_count_only_the_requested_tokens_and_report_the_padding(tiny_peer):
    model_dir, adapters_root = tiny_peer
    requests = _requests([3, 7, 5, 2, 6])
    runs = [PeerRun("batched", 2), PeerRun("batched", 8), PeerRun("sequential", 1, max_requests=3)]
    by_two, by_eight, sequential = benchmark_peer(model_dir, adapters_root, requests, runs, warmup_requests=2)
    # Output is what the requests asked for, whatever the batch: 3 + 7 + 5 + 2 + 6.
    assert by_two.generated_tokens == by_eight.generated_tokens == 23
    # A static batch decodes until its longest request is done: batches (3, 7), (5, 2), (6).
    assert by_two.computed_tokens == 2 * 7 + 2 * 5 + 6
    assert by_eight.computed_tokens == 5 * 7
    assert by_eight.tokens_per_s == pytest.approx(23 / by_eight.elapsed_s)
    assert (by_two.batch_size, by_eight.batch_size, by_eight.num_requests) == (2, 8, 5)
    # One request at a time decodes exactly what each asked for; only the prefix is replayed.
    assert (sequential.num_requests, sequential.generated_tokens, sequential.computed_tokens) == (3, 15, 15)
    assert all(r.adapters_loaded == 2 and r.warmup_requests == 2 for r in (by_two, by_eight, sequential))


def test_peer_run_refuses_a_bad_strategy_or_size_naming_the_field():
    with pytest.raises(ValueError, match="strategy"):
        PeerRun("speculative")
    with pytest.raises(ValueError, match="batch_size"):
        PeerRun("sequential", 4)
    with pytest.raises(ValueError, match="batch_size"):
        PeerRun("batched", 0)
    with pytest.raises(ValueError, match="max_requests"):
        PeerRun("batched", 8, -1)
