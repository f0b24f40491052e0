"""The configuration of `python -m benchmarks.run`: one frozen dataclass, the quick and GPU profiles, and
the command-line flags that build it."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from benchmarks import fixtures

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class BenchConfig:
    scenarios: tuple[int, ...] = (1, 2, 3, 4)  # scenario 5 (transports) on request: --scenarios 5
    quick: bool = False
    seed: int = 0
    alpha: float = 1.0
    prompt_len_range: tuple[int, int] = (16, 48)
    # Scenarios 1, 2 and 5: each request's output length is drawn uniformly from this range.
    output_len_range: tuple[int, int] = (16, 64)
    # Scenario 1
    s1_requests: int = 256
    s1_adapters: int = 100
    # Both sides run the trace's first requests once, untimed, after loading every adapter.
    s1_warmup_requests: int = 8
    # OpenLoRA runs the timed trace this many times and the better pass counts, as the peer's best batch
    # size runs twice (its sweep, then again after the system stopped) and its better pass counts.
    s1_passes: int = 2
    peer_batch_sizes: tuple[int, ...] = (8, 16, 32, 64)
    peer_sequential_requests: int = 8  # one request at a time on a prefix of the trace; 0 = not run
    # Scenario 2: capacity under a TTFT p99 bound, by a rate search of s2_steps steps.
    s2_adapters: tuple[int, ...] = (1, 1000)
    s2_ttft_p99_bound_ms: float = 1000.0
    s2_steps: int = 5
    s2_growth: float = 1.3
    s2_start_rate_per_s: float | None = None  # None: s2_start_fraction x scenario 1's requests/s
    s2_start_fraction: float = 0.6
    s2_start_rate_fallback_per_s: float = 2.0  # without scenario 1
    # A step lasts at least s2_step_s of arrivals and s2_step_min_requests requests.
    s2_step_s: float = 12.0
    s2_step_min_requests: int = 100
    # Scenario 3
    s3_registered: int = 10_000
    s3_touched: int = 1000
    s3_requests: int = 1000
    s3_small_artifacts: int = 300
    s3_prompt_len_range: tuple[int, int] = (8, 16)
    s3_output_len_range: tuple[int, int] = (2, 2)
    s3_rate_per_s: float = 15.0
    # Scenario 4: the length of the trace each configuration's cost is estimated on.
    s4_duration_s: float = 60.0
    # Scenario 5: gRPC against HTTP, each trace run `s5_passes` times per transport, alternating.
    s5_requests: int = 128
    s5_adapters: int = 16
    s5_rate_fraction: float = 0.5  # the paced trace's rate: this fraction of gRPC's offline requests/s
    s5_passes: int = 3
    # Model, adapters and device
    model_shape: str = fixtures.LLAMA_50M.name
    adapter_targets: tuple[str, ...] = fixtures.ALL_PROJECTIONS
    device: str = "cpu"
    # System
    num_adapter_slots: int = 32
    max_num_seqs: int = 128
    max_waiting: int = 4096
    # The worker's adapter host-memory tier (--host-cache-bytes): what bounds its resident memory.
    host_cache_bytes: int = 1 << 30
    kv_cache_bytes: int | None = None  # None: the worker's default
    warmup: bool = True
    database_url: str | None = None
    redis_url: str | None = None
    state_dir: Path | None = None
    results_dir: Path = RESULTS_DIR
    update_results_md: bool = True
    # RESULTS.md section this run replaces (the GPU run keeps its own).
    results_marker: str = "benchmarks.run"
    command: str = "python -m benchmarks.run"

    def __post_init__(self) -> None:
        for label, (low, high) in (
            ("prompt_len_range", self.prompt_len_range),
            ("output_len_range", self.output_len_range),
        ):
            if not 1 <= low <= high:
                raise ValueError(f"{label} must satisfy 1 <= min <= max, got ({low}, {high})")
        if not self.peer_batch_sizes or min(self.peer_batch_sizes) < 1:
            raise ValueError(f"peer_batch_sizes must be sizes >= 1, got {self.peer_batch_sizes}")
        if not self.s2_adapters or min(self.s2_adapters) < 1:
            raise ValueError(f"s2_adapters must be numbers of adapters >= 1, got {self.s2_adapters}")
        if not self.s2_ttft_p99_bound_ms > 0:
            raise ValueError(f"s2_ttft_p99_bound_ms must be > 0, got {self.s2_ttft_p99_bound_ms}")
        if self.s1_passes < 1:
            raise ValueError(f"s1_passes must be >= 1, got {self.s1_passes}")
        if self.s2_steps < 1:
            raise ValueError(f"s2_steps must be >= 1, got {self.s2_steps}")
        if not self.s2_growth > 1:
            raise ValueError(f"s2_growth must be > 1, got {self.s2_growth}")
        if self.s2_start_rate_per_s is not None and not self.s2_start_rate_per_s > 0:
            raise ValueError(f"s2_start_rate_per_s must be > 0, got {self.s2_start_rate_per_s}")
        if not self.s2_step_s > 0 or self.s2_step_min_requests < 1:
            raise ValueError(
                f"s2_step_s must be > 0 and s2_step_min_requests >= 1, got {self.s2_step_s} and "
                f"{self.s2_step_min_requests}"
            )

    @property
    def shape(self) -> fixtures.ModelShape:
        return fixtures.SHAPES[self.model_shape]

    @property
    def adapter_spec(self) -> fixtures.AdapterSpec:
        dtype = "bfloat16" if self.device.startswith("cuda") else "float16"
        return fixtures.AdapterSpec(dtype=dtype, target_modules=self.adapter_targets)

    @property
    def num_full_adapters(self) -> int:
        needed = [0]
        if 1 in self.scenarios:
            needed.append(self.s1_adapters)
        if 2 in self.scenarios:
            needed.append(max(self.s2_adapters))
        if 3 in self.scenarios:
            needed.append(self.s3_touched)
        if 5 in self.scenarios:
            needed.append(self.s5_adapters)
        return max(needed)


QUICK = dict(
    quick=True,
    prompt_len_range=(8, 16),
    output_len_range=(4, 12),
    s1_requests=24,
    s1_adapters=8,
    s1_warmup_requests=2,
    peer_batch_sizes=(4, 8),
    peer_sequential_requests=4,
    s2_adapters=(1, 16),
    s2_steps=3,
    s2_step_s=3.0,
    s2_step_min_requests=12,
    s3_registered=60,
    s3_touched=20,
    s3_requests=24,
    s3_small_artifacts=10,
    s3_rate_per_s=8.0,
    s4_duration_s=10.0,
    s5_requests=16,
    s5_adapters=4,
    s5_passes=1,
    update_results_md=False,
)

# On one GPU (benchmarks/gpu_e2e.sh): a 1.1B Llama in bf16, rank-16 adapters on q/v (4.5 MB each, so
# that a thousand of them can be written, uploaded and fetched within the GPU check's time limit).
GPU = dict(
    scenarios=(1, 2, 4),
    model_shape=fixtures.LLAMA_1B.name,
    adapter_targets=("q_proj", "v_proj"),
    device="cuda",
    prompt_len_range=(32, 128),
    output_len_range=(16, 64),
    s1_requests=256,
    s1_adapters=100,
    # The first GPU run (RESULTS.md) spent its 270 s in the peer's sweep of 8, 16, 32 and 64 without
    # finishing it: PEFT's mixed-adapter batches run one sub-batch per adapter in every LoRA layer, and
    # on a GPU each is host-bound. Two sizes here; the full sweep with `--peer-batch-sizes 8,16,32,64`.
    peer_batch_sizes=(32, 64),
    peer_sequential_requests=8,
    s2_adapters=(1, 1000),
    s2_steps=4,
    s2_step_s=8.0,
    s2_step_min_requests=100,
    max_num_seqs=256,
    kv_cache_bytes=16 << 30,
    results_marker="benchmarks.run.gpu",
)


def config_from_args(argv: list[str] | None, description: str | None = None) -> BenchConfig:
    """The run's configuration from its flags; `description` is the help text's (benchmarks.run's doc)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=description or __doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run with tiny sizes (RESULTS.md untouched)"
    )
    parser.add_argument(
        "--gpu", action="store_true", help="GPU profile: 1.1B bf16 Llama on cuda, scenarios 1, 2, 4"
    )
    parser.add_argument(
        "--scenarios", default=None, help="comma-separated subset of 1,2,3,4,5 (default: 1,2,3,4)"
    )
    parser.add_argument("--database-url", default=None, help="default: embedded PostgreSQL")
    parser.add_argument("--redis-url", default=None, help="default: embedded Redis")
    parser.add_argument("--state-dir", type=Path, default=None, help="kept after the run; default a temp dir")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--s1-requests", type=int)
    parser.add_argument("--peer-batch-sizes", help="comma-separated static batch sizes of the peer's sweep")
    parser.add_argument(
        "--peer-sequential-requests", type=int, help="prefix the one-at-a-time peer replays (0 = skip it)"
    )
    parser.add_argument("--s2-adapters", help="comma-separated numbers of adapters, e.g. 1,1000")
    parser.add_argument("--ttft-p99-bound-ms", type=float, help="scenario 2's bound on TTFT p99 (ms)")
    parser.add_argument("--s2-steps", type=int, help="steps of the rate search per configuration")
    parser.add_argument("--s2-step-s", type=float, help="least seconds of arrivals per step")
    parser.add_argument("--s2-step-min-requests", type=int, help="least requests per step")
    parser.add_argument(
        "--s2-start-rate", type=float, help="requests/s of the first step; default a fraction of scenario 1's"
    )
    parser.add_argument("--s3-registered", type=int)
    parser.add_argument("--s3-touched", type=int)
    parser.add_argument("--s3-requests", type=int)
    parser.add_argument("--s3-rate", type=float)
    parser.add_argument(
        "--output-len",
        help="tokens generated per request in scenarios 1, 2 and 5: N, or MIN,MAX (drawn per request)",
    )
    parser.add_argument("--no-warmup", action="store_true")
    parser.add_argument("--no-results-md", action="store_true", help="do not update benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    cfg = BenchConfig(**GPU) if args.gpu else BenchConfig()
    if args.quick:
        cfg = replace(cfg, **{k: v for k, v in QUICK.items() if not (args.gpu and k == "update_results_md")})
    overrides: dict = {
        "database_url": args.database_url,
        "redis_url": args.redis_url,
        "state_dir": args.state_dir,
        "results_dir": args.results_dir,
        "warmup": not args.no_warmup,
        "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    for flag, key in (
        ("s1_requests", "s1_requests"),
        ("peer_sequential_requests", "peer_sequential_requests"),
        ("ttft_p99_bound_ms", "s2_ttft_p99_bound_ms"),
        ("s2_steps", "s2_steps"),
        ("s2_step_s", "s2_step_s"),
        ("s2_step_min_requests", "s2_step_min_requests"),
        ("s2_start_rate", "s2_start_rate_per_s"),
        ("s3_registered", "s3_registered"),
        ("s3_touched", "s3_touched"),
        ("s3_requests", "s3_requests"),
        ("s3_rate", "s3_rate_per_s"),
    ):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    if args.scenarios:
        overrides["scenarios"] = tuple(sorted(_int_list(args.scenarios, "--scenarios")))
    if args.s2_adapters:
        overrides["s2_adapters"] = _int_list(args.s2_adapters, "--s2-adapters")
    if args.peer_batch_sizes:
        overrides["peer_batch_sizes"] = _int_list(args.peer_batch_sizes, "--peer-batch-sizes")
    if args.output_len:
        lengths = _int_list(args.output_len, "--output-len")
        if len(lengths) not in (1, 2):
            raise ValueError(f"--output-len must be N or MIN,MAX, got {args.output_len!r}")
        overrides["output_len_range"] = (lengths[0], lengths[-1])
    if args.no_results_md:
        overrides["update_results_md"] = False
    return replace(cfg, **overrides)


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from None
