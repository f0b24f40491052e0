"""Per-tier reading of cold-start runs: the worker's own TTFT, queue and adapter-load time of the measured
calls, by the tier each was served from, for one or more runs of `benchmarks/coldstart.py` side by side.

`coldstart.py` writes every measured call to `coldstart-records.json` in its results directory. This reads
those files and prints, per run, pass and tier (device, host, disk, remote), the number of calls and the
medians of the worker's TTFT (`server_ttft_ms`), its queue time and its adapter-load time, so that a change
to one tier's path (a copy or a disk read) reads against the same tier in another run.

    python -m benchmarks.coldstart_tiers before=DIR after=DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarks.coldstart_trace import TIERS

FIGURES = (("server_ttft_ms", "TTFT"), ("queue_ms", "queue"), ("adapter_load_ms", "load"))


def tier_rows(records: dict[str, list[dict]], run: str) -> list[list[str]]:
    """One row per pass and tier with measured calls (the warm-up, scheduled at 0 s, left out)."""
    rows = []
    for label, calls in records.items():
        served = [c for c in calls if c.get("error") is None and c["scheduled_s"] > 0]
        for tier in TIERS:
            of_tier = [c for c in served if c["cache_tier"] == tier]
            if of_tier:
                medians = [f"{statistics.median(c[key] for c in of_tier):.0f}" for key, _ in FIGURES]
                rows.append([run, label, tier, str(len(of_tier)), *medians])
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="NAME=DIR: a results directory of coldstart.py, named")
    args = parser.parse_args(argv)
    header = ["run", "pass", "tier", "calls", *(f"{name} p50 ms" for _, name in FIGURES)]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for run in args.runs:
        name, _, directory = run.partition("=")
        records = json.loads((Path(directory) / "coldstart-records.json").read_text())
        for row in tier_rows(records, name):
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
