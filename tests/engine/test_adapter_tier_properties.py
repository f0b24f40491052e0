"""Property: random interleavings of requests, steps, invalidations, deletions, prefetches, demotes and
aborts through the real engine (small slot, host and KV budgets force eviction and preemption), with the
worker's artifact store holding each request's files, never raise, end every request exactly once with
the tokens it gets alone (or a clean abort), and leak no slot reference, host buffer, KV block or hold;
requests start their adapter's load on arrival, and no prefetch counts as wasted that was not performed.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_plane.engine.request import AdapterRef
from data_plane.server.artifact_store import ArtifactStore
from openlora.artifact import ARTIFACT_FILES

from .conftest import greedy, make_engine, run_to_completion

NAMES = ["r4_qv", "r8_all", "r16_rslora", "r64_all"]
# 1, 1 and 2 KV blocks; the last two need one block more as they generate.
PROMPTS = [[7, 3, 9, 1, 4], [11, 2] * 7, list(range(30, 60))]
MAX_TOKENS = 6
NUM_SLOTS = 2
HOST_BUDGET_BYTES = 100_000  # r4_qv (7 KB) with r8_all (64 KB) or r16_rslora (76 KB); r64_all (512 KB) never
NUM_KV_BLOCKS = 5  # filled at admission by four short requests, outgrown as they generate: preemption


@pytest.fixture(scope="module")
def sources(tiny_llama):
    """sha256 -> the adapter's directory (what the control plane would stream) and name -> sha256."""
    by_sha = {tiny_llama.ref(name).key: tiny_llama.adapter_dirs[name] for name in NAMES}
    return by_sha, {name: tiny_llama.ref(name).key for name in NAMES}


@pytest.fixture(scope="module")
def expected(tiny_llama):
    """(adapter index or None, prompt index) -> greedy tokens of that request run alone."""
    engine = make_engine(tiny_llama, num_adapter_slots=len(NAMES))
    cases = {}
    for adapter in [None, *range(len(NAMES))]:
        for p, prompt in enumerate(PROMPTS):
            refs = [] if adapter is None else [tiny_llama.ref(NAMES[adapter])]
            engine.add_request(greedy(f"{adapter}-{p}", prompt, refs, max_tokens=MAX_TOKENS))
            cases[(adapter, p)] = f"{adapter}-{p}"
    results = run_to_completion(engine)
    engine.shutdown()
    return {case: results[request_id][0] for case, request_id in cases.items()}


def _fetcher(by_sha: dict[str, Path]):
    async def fetch(sha256: str):
        for name in sorted(ARTIFACT_FILES):
            data = (by_sha[sha256] / name).read_bytes()
            yield SimpleNamespace(filename=name, offset=0, data=data, file_size_bytes=len(data))

    return fetch


adapter_index = st.integers(0, len(NAMES) - 1)
# Two tenants: fair shares preempt running work and free adapter slots (scheduler._rebalance) in every
# interleaving too.
request = st.tuples(
    st.one_of(st.none(), adapter_index),
    st.integers(0, len(PROMPTS) - 1),
    st.integers(1, MAX_TOKENS),
    st.sampled_from(["tenant-a", "tenant-b"]),
)
operations = st.one_of(
    st.tuples(
        st.just("add"), st.lists(request, min_size=1, max_size=4)
    ),  # a burst contends for slots and blocks
    st.tuples(st.just("step"), st.integers(1, 4)),
    st.tuples(st.just("invalidate"), adapter_index),
    st.tuples(st.just("delete"), adapter_index),
    st.tuples(st.just("prefetch"), adapter_index, st.booleans()),
    st.tuples(st.just("demote"), adapter_index),
    st.tuples(st.just("abort"), st.integers(0, 30)),
)


@dataclass
class _Request:
    case: tuple[int | None, int]
    max_tokens: int
    sha256: str | None
    tokens: list[int] = field(default_factory=list)
    aborted: bool = False
    finish_reason: str | None = None


@settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(ops=st.lists(operations, min_size=3, max_size=25))
def test_random_interleavings_never_raise_end_every_request_and_leak_nothing(
    tiny_llama, sources, expected, ops
):
    by_sha, sha_of = sources
    root = Path(tempfile.mkdtemp(prefix="tier-props-"))
    loop = asyncio.new_event_loop()
    engine = make_engine(
        tiny_llama,
        num_adapter_slots=NUM_SLOTS,
        host_cache_bytes=HOST_BUDGET_BYTES,
        num_kv_blocks=NUM_KV_BLOCKS,
        max_num_seqs=4,
    )
    store = ArtifactStore(root, _fetcher(by_sha), engine.spec, 64, 16 << 20, busy=engine.loader.is_loading)
    free_blocks = engine.scheduler.blocks.num_free_blocks
    requests: dict[str, _Request] = {}

    def step() -> None:
        for out in engine.step():  # never raises
            request = requests[out.request_id]
            assert request.finish_reason is None, f"{out.request_id} ended twice"
            assert out.error is None, f"{out.request_id} failed: {out.error!r}"
            request.tokens.extend(out.new_token_ids)
            if out.finished:
                request.finish_reason = out.finish_reason
                if request.sha256 is not None:
                    store.release([request.sha256])

    try:
        for op in ops:
            kind = op[0]
            if kind == "add":
                for adapter, prompt, max_tokens, tenant in op[1]:
                    request_id = f"q{len(requests)}"
                    sha = None if adapter is None else sha_of[NAMES[adapter]]
                    refs = []
                    if sha is not None:
                        local = loop.run_until_complete(store.ensure(sha, hold=True))  # as the servicer does
                        refs = [AdapterRef(sha, local.path)]
                    requests[request_id] = _Request((adapter, prompt), max_tokens, sha)
                    engine_request = greedy(request_id, PROMPTS[prompt], refs, max_tokens=max_tokens)
                    engine_request.tenant = tenant
                    engine.add_request(engine_request)
            elif kind == "step":
                for _ in range(op[1]):
                    step()
            elif kind == "invalidate":
                engine.invalidate(sha_of[NAMES[op[1]]])
            elif kind == "delete":  # as on a NOT_FOUND or an invalidation hint: the artifact and the engine
                sha = sha_of[NAMES[op[1]]]
                store.discard(sha)
                engine.invalidate(sha)
            elif kind == "prefetch":
                sha = sha_of[NAMES[op[1]]]
                local = loop.run_until_complete(store.ensure(sha))
                engine.prefetch(sha, (AdapterRef(sha, local.path),), to_device=op[2])
            elif kind == "demote":
                engine.demote(sha_of[NAMES[op[1]]])
            elif kind == "abort" and requests:
                request_id = sorted(requests)[op[1] % len(requests)]
                if requests[request_id].finish_reason is None:
                    requests[request_id].aborted = True
                engine.abort(request_id)
        for _ in range(2_000):  # finish: run until every request ended and every load landed
            if not engine.has_unfinished():
                break
            step()
        assert not engine.has_unfinished()

        for request_id, request in requests.items():
            want = expected[request.case][: request.max_tokens]
            if request.aborted:
                assert request.finish_reason == "abort", request_id
                assert request.tokens == want[: len(request.tokens)], request_id
            else:
                assert request.finish_reason == "length", request_id
                assert request.tokens == want, request_id
        # Nothing leaked: KV blocks, slots and references, host buffers and their accounting, loads, holds.
        cache = engine.adapter_cache
        assert engine.scheduler.blocks.num_free_blocks == free_blocks
        assert engine.loader.num_in_flight == 0 and not engine._states
        for sha in sha_of.values():
            assert cache.refcount(sha) == 0 and not cache.is_retiring(sha)
            assert cache.state(sha) is None or cache.slot_of(sha) is not None  # no slot left LOADING
            assert not store.is_held(sha) and not store.is_stale(sha)
        assert cache.num_free_slots + len(cache.resident_keys()) == NUM_SLOTS
        host_keys = cache.host_keys()
        assert all(cache.host_buffer(key) is not None for key in host_keys)
        assert cache.host_used_bytes == sum(cache.host_buffer(key).size_bytes for key in host_keys)
        assert cache.host_used_bytes <= HOST_BUDGET_BYTES
        assert sorted(engine.host_adapter_keys()) == sorted(host_keys)
        assert sorted(engine.resident_adapter_keys()) == sorted(cache.resident_keys())
        # A prefetch is wasted at most once, and only one that was performed.
        stats = engine.prefetch_stats()
        for tier in ("host", "device"):
            assert stats.get(("wasted", tier), 0) <= stats.get(("performed", tier), 0), stats
    finally:
        engine.shutdown()
        loop.close()
        shutil.rmtree(root, ignore_errors=True)
