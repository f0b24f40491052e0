"""Saved cold-start runs read again: each pass's long-tail TTFT p99 against the popular calls', beside the
same ratio when the pass's measured calls are dealt out to the two groups at random
(`coldstart_trace.label_permutations`), for runs written before `benchmarks.coldstart` reported it.

    python -m benchmarks.coldstart_recheck RESULTS.json RECORDS.json[.gz] [more pairs ...]

The trace of each pass is generated again from the run's own config (the same config always gives the
same trace), so the calls fall into the same groups (popular, long tail, measured hours) as in the run.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from dataclasses import fields
from pathlib import Path

from benchmarks.coldstart_trace import ColdStartTraceConfig, analyze, generate_coldstart_trace


def _load(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)


def trace_config(results: dict, tail: str) -> ColdStartTraceConfig:
    saved = results["config"]["trace"]
    known = {f.name for f in fields(ColdStartTraceConfig)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in known}
    return ColdStartTraceConfig(**(values | {"tail": tail}))


def recheck(results: dict, records: dict) -> dict[str, dict | None]:
    """Per pass label: `label_permutations` of the long tail's p99 over the popular calls' p99."""
    out = {}
    for label, figures in results["passes"].items():
        requests = generate_coldstart_trace(trace_config(results, figures["tail"]))
        out[label] = analyze(requests, records[label])["p99_ratio_by_chance"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", type=Path, nargs="+", help="pairs: a run's results JSON, then its records")
    args = parser.parse_args(argv)
    if len(args.files) % 2:
        parser.error("give the files in pairs: results JSON, records JSON")
    for results_path, records_path in zip(args.files[::2], args.files[1::2], strict=True):
        results = _load(results_path)
        print(f"{results_path.name} ({results.get('started_at', '?')}):")
        for label, c in recheck(results, _load(records_path)).items():
            if c is None:
                print(f"  {label}: no calls in one of the groups")
                continue
            print(
                f"  {label}: long-tail p99 / popular p99 {c['observed']:.3f} over {c['sizes'][0]} and "
                f"{c['sizes'][1]} calls; dealt out at random: median {c['median']:.3f}, at or above 1.2 "
                f"{c['share_at_or_above_target']:.0%}, at or above the observed {c['p_value']:.0%}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
