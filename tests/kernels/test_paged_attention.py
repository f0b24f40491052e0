"""Paged decode attention: the Triton kernel (on the CPU through the Triton interpreter), the CPU torch
paths and the CPU's native kernel (openlora_kernels/attention_cpu.c, float32) against a per-sequence float64
reference written from the definition.

Grid: dtype x GQA ratio (1, 4, 8) x head_dim (64, 128) on a batch whose contexts are 1, block_size - 1,
block_size and many blocks long; then a block size smaller than a tile and not a power of two, strided q,
int32 indices. Table entries past a sequence's blocks point at a poison block of large values, so any read
past the context shows in the output. Inputs are fresh random values per case. With a sliding window the
keys before each sequence's window are poisoned too, so any read of them shows as well.
"""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch

from data_plane.model.quant import native as native_module
from data_plane.model.quant.native import native_kernels, native_kernels_problem
from openlora_kernels import paged_attention
from openlora_kernels.checks import KernelArgumentError
from openlora_kernels.triton_ops import paged_decode

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCE = {  # (atol, rtol) against the float64 reference: float32 sums, one rounding to the dtype
    torch.float32: (2e-5, 1e-4),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 2e-2),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
POISON = 50.0


def reference(q, k_cache, v_cache, block_tables, context_lens, scale, window=None):
    """out[d, h] = softmax(scale * K_d @ q[d, h]) @ V_d over the sequence's first context_lens[d] tokens
    (with a window, only the last `window` of them), one sequence and head at a time in float64."""
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    keys = k_cache.double().reshape(-1, num_kv_heads, head_dim).cpu()
    values = v_cache.double().reshape(-1, num_kv_heads, head_dim).cpu()
    out = torch.empty(num_seqs, num_heads, head_dim, dtype=torch.float64)
    for d in range(num_seqs):
        n = int(context_lens[d])
        first = 0 if window is None else max(0, n - window)
        slots = [int(block_tables[d, t // block_size]) * block_size + t % block_size for t in range(first, n)]
        for h in range(num_heads):
            k, v = keys[slots, h // group], values[slots, h // group]  # (n, head_dim)
            weights = torch.softmax(scale * (k @ q[d, h].double().cpu()), dim=0)
            out[d, h] = weights @ v
    return out


def make_case(seed, dtype, num_kv_heads, ratio, head_dim, block_size, lens, table_dtype=torch.int64):
    """A cache whose blocks are shuffled among the sequences, one poison block (id 0) for the padding."""
    gen = torch.Generator().manual_seed(seed)
    num_seqs = len(lens)
    blocks_per_seq = [-(-n // block_size) for n in lens]
    max_blocks = max(blocks_per_seq) + 1  # one column of padding past the longest sequence too
    num_blocks = sum(blocks_per_seq) + 3
    order = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()  # block 0 is the poison
    tables = torch.zeros(num_seqs, max_blocks, dtype=table_dtype)
    for d, count in enumerate(blocks_per_seq):
        tables[d, :count] = torch.tensor([order.pop() for _ in range(count)])
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    k_cache[0], v_cache[0] = POISON, POISON
    # The unused tail of each sequence's last block is poison as well.
    for d, n in enumerate(lens):
        if n % block_size:
            last = int(tables[d, blocks_per_seq[d] - 1])
            k_cache[last, n % block_size :], v_cache[last, n % block_size :] = POISON, POISON
    q = torch.randn(num_seqs, num_kv_heads * ratio, head_dim, generator=gen)
    to = dict(device=DEVICE, dtype=dtype)
    return dict(
        q=q.to(**to),
        k_cache=k_cache.to(**to),
        v_cache=v_cache.to(**to),
        block_tables=tables.to(DEVICE),
        context_lens=torch.tensor(lens, dtype=table_dtype, device=DEVICE),
        scale=head_dim**-0.5,
    )


def check(out, case, dtype):
    atol, rtol = TOLERANCE[dtype]
    assert out.dtype == dtype and out.shape == case["q"].shape
    want = reference(**case)
    torch.testing.assert_close(out.double().cpu(), want, atol=atol, rtol=rtol)


BLOCK_SIZE = 16
LENS = [1, BLOCK_SIZE - 1, BLOCK_SIZE, 5 * BLOCK_SIZE + 3]
GRID = [
    pytest.param(dtype, ratio, (64, 128)[i % 2], id=f"{name}-gqa{ratio}-d{(64, 128)[i % 2]}")
    for i, ((name, dtype), ratio) in enumerate(itertools.product(DTYPES.items(), (1, 4, 8)))
]


@pytest.mark.parametrize(("dtype", "ratio", "head_dim"), GRID)
def test_triton_kernel_matches_the_reference(dtype, ratio, head_dim):
    seed = zlib.crc32(repr((dtype, ratio, head_dim)).encode())
    case = make_case(seed, dtype, 2, ratio, head_dim, BLOCK_SIZE, LENS)
    check(paged_decode.paged_decode_attention(**case), case, dtype)


@pytest.mark.parametrize("path", list(paged_attention.CPU_PATHS))
@pytest.mark.parametrize(("dtype", "ratio", "head_dim"), GRID)
def test_cpu_paths_match_the_reference(path, dtype, ratio, head_dim):
    seed = zlib.crc32(repr((path, dtype, ratio, head_dim)).encode())
    case = make_case(seed, dtype, 2, ratio, head_dim, BLOCK_SIZE, LENS)
    check(paged_attention.CPU_PATHS[path](**case), case, dtype)


@pytest.mark.parametrize("path", ["triton", *paged_attention.CPU_PATHS])
def test_small_odd_block_size_and_tiles_spanning_blocks(path):
    # block_size 5 < the 16-token tile: one tile reads four blocks; head_dim 80 pads to 128 lanes.
    case = make_case(3, torch.float32, 1, 4, 80, 5, [1, 4, 5, 6, 37])
    fn = paged_attention.CPU_PATHS.get(path)
    out = fn(**case) if fn else paged_decode.paged_decode_attention(**case, block_n=16)
    check(out, case, torch.float32)


def test_strided_q_and_int32_indices():
    case = make_case(4, torch.float16, 2, 4, 64, BLOCK_SIZE, [3, 40, 17], table_dtype=torch.int32)
    wide = torch.randn(3, 20, 64, device=DEVICE, dtype=torch.float16)
    wide[:, 4:12] = case["q"]  # q as a slice of a wider (fused projection) output
    out = paged_decode.paged_decode_attention(**{**case, "q": wide[:, 4:12]}, max_context_len=40)
    check(out, case, torch.float16)


def test_entry_point_picks_by_device_and_can_force_the_kernel():
    case = make_case(5, torch.float32, 2, 1, 64, BLOCK_SIZE, [7, 33])
    check(paged_attention.paged_decode_attention(**case), case, torch.float32)
    check(paged_attention.paged_decode_attention(**case, use_triton=False), case, torch.float32)
    with pytest.raises(KernelArgumentError, match="context_lens"):  # the call reached the kernel's checks
        paged_attention.paged_decode_attention(
            **{**case, "context_lens": case["context_lens"] * 0}, use_triton=True
        )


def test_an_empty_batch_gives_an_empty_result():
    case = make_case(6, torch.float32, 2, 1, 64, BLOCK_SIZE, [4])
    empty = {
        **case,
        "q": case["q"][:0],
        "block_tables": case["block_tables"][:0],
        "context_lens": case["context_lens"][:0],
    }
    assert paged_decode.paged_decode_attention(**empty).shape == (0, 2, 64)


@pytest.mark.skipif(
    DEVICE.type != "cpu", reason="checks the CPU interpreter; on CUDA the compiled kernel runs"
)
def test_kernel_runs_in_the_triton_interpreter_without_cuda():
    assert paged_decode._INTERPRETED


def _valid():
    return make_case(7, torch.float16, 2, 2, 64, BLOCK_SIZE, [3, 20])


@pytest.mark.parametrize(
    ("argument", "change"),
    [
        ("q", lambda c: {"q": c["q"].to(torch.int32)}),
        ("q", lambda c: {"q": c["q"][:, :, :32].contiguous().transpose(1, 2)}),
        ("k_cache", lambda c: {"k_cache": c["k_cache"].float()}),
        ("k_cache", lambda c: {"k_cache": c["k_cache"][..., :32]}),
        ("k_cache", lambda c: {"q": c["q"][:, :3].contiguous()}),  # 3 heads over 2 kv heads
        ("v_cache", lambda c: {"v_cache": c["v_cache"][1:]}),
        ("block_tables", lambda c: {"block_tables": c["block_tables"].float()}),
        ("block_tables", lambda c: {"block_tables": c["block_tables"][:1]}),
        ("block_tables", lambda c: {"block_tables": c["block_tables"] + 100}),
        ("block_tables", lambda c: {"block_tables": c["block_tables"] - 1}),
        ("context_lens", lambda c: {"context_lens": c["context_lens"] * 0}),
        ("context_lens", lambda c: {"context_lens": c["context_lens"] + 1000}),
        ("context_lens", lambda c: {"context_lens": c["context_lens"][:1]}),
        ("max_context_len", lambda c: {"max_context_len": 10_000}),
        ("block_n", lambda c: {"block_n": 24}),
    ],
)  # fmt: skip
def test_bad_arguments_are_refused_naming_the_argument(argument, change):
    case = _valid()
    with pytest.raises(KernelArgumentError) as raised:
        paged_decode.paged_decode_attention(**{**case, **change(case)})
    assert raised.value.argument == argument


# -- CUDA: the compiled kernel on larger shapes (benchmarks/gpu_check.sh) --------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize(("ratio", "head_dim"), [(1, 64), (4, 128), (8, 64), (8, 128)])
def test_compiled_kernel_matches_gather_sdpa_on_cuda(dtype, ratio, head_dim):
    seed = zlib.crc32(repr((dtype, ratio, head_dim)).encode())
    gen = torch.Generator().manual_seed(seed)
    lens = [1, 15, 16, 17, 255, 256, 1000, 2047, *torch.randint(1, 600, (56,), generator=gen).tolist()]
    case = make_case(seed, dtype, 4, ratio, head_dim, BLOCK_SIZE, lens)
    out = paged_decode.paged_decode_attention(**case)
    # gather_sdpa in float32 is the reference here: it matches the float64 one above on the CPU grid.
    wide = {k: v.float() if k in ("q", "k_cache", "v_cache") else v for k, v in case.items()}
    want = paged_attention.gather_sdpa(**wide)
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), want, atol=atol, rtol=rtol)
    lone = make_case(11, dtype, 4, ratio, head_dim, BLOCK_SIZE, lens[:8])
    check(paged_decode.paged_decode_attention(**lone), lone, dtype)


@pytest.mark.parametrize("path", list(paged_attention.CPU_PATHS))
def test_cpu_paths_on_more_sequences_than_groups_in_shuffled_order(path):
    lens = [37, 1, 64, 16, 90, 15, 17, 33, 2, 64, 48]  # groups share a padded length, rows not sorted
    case = make_case(8, torch.float32, 2, 4, 64, BLOCK_SIZE, lens)
    check(paged_attention.CPU_PATHS[path](**case), case, torch.float32)


@pytest.mark.parametrize("max_gather_bytes", [1, 3 * BLOCK_SIZE * 2 * 64 * 4])
def test_bucketed_sdpa_cut_into_chunks_by_copy_size_still_matches(monkeypatch, max_gather_bytes):
    # A cap of one byte puts every sequence in its own chunk; the other holds about three blocks of K.
    monkeypatch.setattr(paged_attention, "MAX_GATHER_BYTES", max_gather_bytes)
    lens = [37, 1, 64, 16, 90, 15, 17, 33, 2, 64, 48, 5, 70]
    case = make_case(9, torch.float32, 2, 4, 64, BLOCK_SIZE, lens)
    check(paged_attention.bucketed_sdpa(**case), case, torch.float32)


# -- Sliding windows: the query at position n - 1 sees positions n - window .. n - 1 -------------------------

WINDOW_LENS = [1, 7, BLOCK_SIZE, BLOCK_SIZE + 1, 37, 5 * BLOCK_SIZE + 3]


def with_window(case, window):
    """The case with `window`, each sequence's keys and values before its window set to POISON."""
    _, block_size, _, _ = case["k_cache"].shape
    k_cache, v_cache = case["k_cache"].clone(), case["v_cache"].clone()
    for d, n in enumerate(case["context_lens"].tolist()):
        for t in range(max(0, n - window)):
            block = int(case["block_tables"][d, t // block_size])
            k_cache[block, t % block_size], v_cache[block, t % block_size] = POISON, POISON
    return {**case, "k_cache": k_cache, "v_cache": v_cache, "window": window}


def run_path(path, case, **options):
    if path == "native":
        return native(**case)
    fn = paged_attention.CPU_PATHS.get(path)
    return fn(**case, **options) if fn else paged_decode.paged_decode_attention(**case, **options)


@pytest.mark.parametrize("path", ["triton", "native", *paged_attention.CPU_PATHS])
# 1: the query alone; 5, 16, 21: shorter than most contexts, 16 on a block edge; 83: the longest context
# exactly; 1000: longer than every context (the whole context, as without a window)
@pytest.mark.parametrize("window", [1, 5, BLOCK_SIZE, 21, 5 * BLOCK_SIZE + 3, 1000])
def test_sliding_window_attends_to_the_last_window_tokens_only(path, window):
    seed = zlib.crc32(repr((path, window)).encode())
    case = with_window(make_case(seed, torch.float32, 2, 4, 64, BLOCK_SIZE, WINDOW_LENS), window)
    check(run_path(path, case), case, torch.float32)


@pytest.mark.parametrize("path", ["triton", "native", *paged_attention.CPU_PATHS])
def test_sliding_window_skips_whole_tiles_and_blocks_before_it(path):
    # 16-token tiles over blocks of 5: the window of the long sequences starts several tiles and blocks in,
    # the short ones' at 0, so the block loop meets columns where a sequence has no key yet.
    case = with_window(make_case(12, torch.float32, 1, 4, 80, 5, [2, 9, 70, 71, 96]), 19)
    options = {} if path in ("native", *paged_attention.CPU_PATHS) else {"block_n": 16}
    check(run_path(path, case, **options), case, torch.float32)


@pytest.mark.parametrize("path", ["triton", *paged_attention.CPU_PATHS])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_sliding_window_in_half_precision(path, dtype):
    seed = zlib.crc32(repr((path, dtype)).encode())
    case = with_window(make_case(seed, dtype, 2, 8, 128, BLOCK_SIZE, WINDOW_LENS), 21)
    check(run_path(path, case), case, dtype)


@pytest.mark.parametrize("max_context_len", [83, 20])
def test_triton_window_with_a_known_longest_context(max_context_len):
    # 83: the window (21) is shorter than some context and applies; 20: it covers every context, and the
    # kernel compiled without the window's code gives the same result.
    lens = WINDOW_LENS if max_context_len == 83 else [1, 7, 20]
    case = with_window(make_case(13, torch.float32, 2, 1, 64, BLOCK_SIZE, lens), 21)
    check(paged_decode.paged_decode_attention(**case, max_context_len=max_context_len), case, torch.float32)


def test_entry_point_passes_the_window_to_either_path():
    case = with_window(make_case(14, torch.float32, 2, 1, 64, BLOCK_SIZE, WINDOW_LENS), 9)
    check(paged_attention.paged_decode_attention(**case, use_triton=True), case, torch.float32)
    check(paged_attention.paged_decode_attention(**case, use_triton=False), case, torch.float32)


@pytest.mark.parametrize("max_gather_bytes", [1, 3 * BLOCK_SIZE * 2 * 64 * 4])
def test_bucketed_sdpa_with_a_window_cut_into_chunks_still_matches(monkeypatch, max_gather_bytes):
    monkeypatch.setattr(paged_attention, "MAX_GATHER_BYTES", max_gather_bytes)
    lens = [37, 1, 64, 16, 90, 15, 17, 33, 2, 64, 48, 5, 70]
    case = with_window(make_case(15, torch.float32, 2, 4, 64, BLOCK_SIZE, lens), 24)
    check(paged_attention.bucketed_sdpa(**case), case, torch.float32)


@pytest.mark.parametrize("window", [0, -3, 2.5, True])
def test_a_window_below_one_is_refused(window):
    with pytest.raises(KernelArgumentError) as raised:
        paged_decode.paged_decode_attention(**_valid(), window=window)
    assert raised.value.argument == "window"


# -- The CPU's native kernel (openlora_kernels/attention_cpu.c): float32, K and V read in place ------------------------


@pytest.fixture(scope="module")
def cpu_kernels():
    kernels = native_kernels()
    assert kernels is not None, native_kernels_problem()  # the test machine has a C compiler
    return kernels


def native(q, k_cache, v_cache, block_tables, context_lens, scale, window=None):
    """The case through the native kernel, on CPU copies of its tensors."""
    kernels = native_kernels()
    assert kernels is not None, native_kernels_problem()
    tables = kernels.decode_tables(block_tables.cpu(), context_lens.cpu())
    return kernels.paged_decode(q.cpu(), k_cache.cpu(), v_cache.cpu(), tables, scale, window)


@pytest.mark.parametrize(
    ("kv_heads", "ratio", "head_dim", "block_size"),
    [
        (2, 1, 64, BLOCK_SIZE),
        (2, 4, 128, BLOCK_SIZE),
        (1, 16, 256, BLOCK_SIZE),
        (4, 8, 80, 5),
        (2, 2, 64, 64),
    ],
)
def test_native_kernel_matches_the_reference(cpu_kernels, kv_heads, ratio, head_dim, block_size):
    # Poison past each context and in the padding columns: a read there shows in the output.
    seed = zlib.crc32(repr((kv_heads, ratio, head_dim, block_size)).encode())
    lens = [1, block_size - 1, block_size, block_size + 1, 5 * block_size + 3]
    case = make_case(seed, torch.float32, kv_heads, ratio, head_dim, block_size, lens)
    check(native(**case).to(DEVICE), case, torch.float32)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native_kernel_gives_the_same_result_at_any_thread_count(cpu_kernels, threads):
    lens = [37, 1, 64, 16, 90, 15, 17, 33, 2, 64, 48, 5, 70]
    case = make_case(16, torch.float32, 2, 4, 64, BLOCK_SIZE, lens)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native(**case)
        torch.set_num_threads(threads)
        assert torch.equal(native(**case), one)  # a work item's sums never depend on the split
    finally:
        torch.set_num_threads(before)
    check(one.to(DEVICE), case, torch.float32)


def test_native_kernel_reads_q_through_its_strides_and_an_empty_context_gives_zeros(cpu_kernels):
    case = make_case(17, torch.float32, 2, 4, 64, BLOCK_SIZE, [3, 40, 17])
    wide = torch.randn(3, 20, 64)
    wide[:, 4:12] = case["q"].cpu()  # q as a slice of a wider (fused projection) output
    check(native(**{**case, "q": wide[:, 4:12]}).to(DEVICE), case, torch.float32)
    empty = {**case, "context_lens": case["context_lens"] * 0}
    assert torch.equal(native(**empty), torch.zeros(3, 8, 64))
    nothing = {**case, "q": case["q"][:0], "block_tables": case["block_tables"][:0]}
    assert native(**{**nothing, "context_lens": case["context_lens"][:0]}).shape == (0, 8, 64)


def _native_valid():
    return make_case(18, torch.float32, 2, 2, 64, BLOCK_SIZE, [3, 20])


NATIVE_REFUSALS = [
    ("float32", lambda c: {"q": c["q"].half()}),
    ("float32", lambda c: {"k_cache": c["k_cache"].double(), "v_cache": c["v_cache"].double()}),
    ("last dimension contiguous", lambda c: {"q": c["q"].transpose(1, 2).contiguous().transpose(1, 2)}),
    ("contiguous", lambda c: {"k_cache": c["k_cache"].transpose(0, 1).contiguous().transpose(0, 1)}),
    ("does not fit", lambda c: {"q": c["q"][:, :, :32]}),  # head_dim 32 over caches of 64
    ("evenly", lambda c: {"q": c["q"][:, :3]}),  # 3 heads over 2 kv heads
    ("v_cache", lambda c: {"v_cache": c["v_cache"][1:]}),
    ("rows", lambda c: {"q": c["q"][:1]}),
    ("outside a cache", lambda c: {"k_cache": c["k_cache"][:2], "v_cache": c["v_cache"][:2]}),
    ("past", lambda c: {"context_lens": c["context_lens"] + 1000}),
    ("int64", lambda c: {"block_tables": c["block_tables"].int()}),
    ("int64", lambda c: {"context_lens": c["context_lens"].float()}),
    ("negative", lambda c: {"block_tables": c["block_tables"] - 1}),
    ("negative", lambda c: {"context_lens": c["context_lens"] - 10}),
    ("context lengths", lambda c: {"context_lens": c["context_lens"][:1]}),
    ("window", lambda c: {"window": 0}),
    ("window", lambda c: {"window": 2.5}),
]  # fmt: skip


@pytest.mark.parametrize(("words", "change"), NATIVE_REFUSALS)
def test_what_the_native_kernel_cannot_read_as_assumed_is_refused(cpu_kernels, words, change):
    case = _native_valid()
    with pytest.raises(ValueError, match=words):
        native(**{**case, **change(case)})


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "block_size", "words"),
    [(32, 1, 64, 16, "query heads per kv head"), (8, 8, 512, 16, "of 512"), (8, 8, 64, 128, "blocks of 128")],
)
def test_shapes_past_the_native_kernels_bounds_are_named(heads, kv_heads, head_dim, block_size, words):
    # The model runner then keeps the torch path (see tests/engine/test_lora_parity.py for the choice).
    assert words in native_module.attention_shape_problem(heads, kv_heads, head_dim, block_size)
    assert native_module.attention_shape_problem(8, 2, 128, 16) is None


# -- The native rotary embedding and cache writes: torch's floats, in one call ------------------------------


def _rope_case(seed, rows=7, heads=8, kv_heads=2, head_dim=64, num_blocks=6, block_size=4):
    """q, k, v as column views of one fused projection output, (cos, sin) tables, rows' slots scattered over
    a cache of num_blocks * block_size positions, and the caches."""
    gen = torch.Generator().manual_seed(seed)
    fused = torch.randn(rows, (heads + 2 * kv_heads) * head_dim, generator=gen)
    q, k, v = fused.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=1)
    q, k, v = (t.view(rows, -1, head_dim) for t in (q, k, v))
    angles = torch.rand(rows, 1, head_dim, generator=gen) * 6.3
    rope = (angles.cos(), angles.sin())
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:rows]
    caches = [torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen) for _ in range(2)]
    return q, k, v, rope, slots, caches


def test_native_rotary_and_cache_writes_give_torchs_floats_exactly(cpu_kernels):
    from data_plane.model.llama import apply_rotary

    q, k, v, rope, slots, (k_cache, v_cache) = _rope_case(19)
    want_q, want_k = apply_rotary(q, rope), apply_rotary(k, rope)
    want_k_cache, want_v_cache = k_cache.clone(), v_cache.clone()
    want_k_cache.view(-1, 2, 64).index_copy_(0, slots, want_k)
    want_v_cache.view(-1, 2, 64).index_copy_(0, slots, v)
    v_before = v.clone()
    cpu_kernels.kv_slots(slots).rope_kv_write(q, k, v, rope, k_cache, v_cache)
    assert torch.equal(q, want_q) and torch.equal(k, want_k) and torch.equal(v, v_before)
    assert torch.equal(k_cache, want_k_cache) and torch.equal(v_cache, want_v_cache)  # other slots untouched


def _rope_refusals():
    def swap(index, value):
        return lambda case: (*case[:index], value(case), *case[index + 1 :])

    return [
        ("q must be float32", swap(0, lambda c: c[0].double())),
        ("last dimension contiguous", swap(1, lambda c: c[1].transpose(1, 2))),
        ("rows", swap(2, lambda c: c[2][:3])),
        ("no even head_dim", swap(2, lambda c: c[2][:, :1])),
        ("cos must be", swap(3, lambda c: (c[3][0][:, :, :32], c[3][1]))),
        ("sin must be", swap(3, lambda c: (c[3][0], c[3][1].transpose(0, 2)))),
        ("k_cache must be", swap(5, lambda c: [c[5][0][..., :32], c[5][1]])),
        ("v_cache", swap(5, lambda c: [c[5][0], c[5][1][1:]])),
        ("outside a cache", swap(5, lambda c: [c[5][0][:1], c[5][1][:1]])),
    ]


@pytest.mark.parametrize(("words", "change"), _rope_refusals())
def test_what_the_native_rotary_cannot_read_or_write_as_assumed_is_refused(cpu_kernels, words, change):
    q, k, v, rope, slots, caches = change(_rope_case(20))
    with pytest.raises(ValueError, match=words):
        cpu_kernels.kv_slots(slots).rope_kv_write(q, k, v, rope, *caches)


@pytest.mark.parametrize(
    ("slots", "words"),
    [
        (torch.tensor([1, -2]), "negative"),
        (torch.tensor([1.0]), "int64"),
        (torch.arange(8)[::2], "contiguous"),
    ],
)
def test_slot_ids_the_native_writes_cannot_trust_are_refused(cpu_kernels, slots, words):
    with pytest.raises(ValueError, match=words):
        cpu_kernels.kv_slots(slots)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("window", [1, 100, 4096])
def test_compiled_kernel_with_a_window_matches_gather_sdpa_on_cuda(dtype, window):
    seed = zlib.crc32(repr((dtype, window)).encode())
    gen = torch.Generator().manual_seed(seed)
    lens = [1, 99, 100, 101, 255, 2047, *torch.randint(1, 600, (26,), generator=gen).tolist()]
    case = with_window(make_case(seed, dtype, 4, 4, 128, BLOCK_SIZE, lens), window)
    out = paged_decode.paged_decode_attention(**case)
    wide = {k: v.float() if k in ("q", "k_cache", "v_cache") else v for k, v in case.items()}
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), paged_attention.gather_sdpa(**wide), atol=atol, rtol=rtol)
