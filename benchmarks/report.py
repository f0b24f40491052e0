"""Presentation of a benchmark run: the one table, the PNG plots and the issue-6 section of RESULTS.md."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

MARKER = "benchmarks.run"
SECTION_BEGIN = f"<!-- {MARKER}:begin -->"
SECTION_END = f"<!-- {MARKER}:end -->"


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A left-aligned plain-text table (also valid Markdown)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)


def plot_throughput_vs_adapters(points: Sequence[tuple[int, float]], path: Path, title: str) -> None:
    """points: (number of adapters, tokens/s); the y axis reads tokens/s sustained."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    xs, ys = zip(*points, strict=True) if points else ((), ())
    ax.plot(xs, ys, marker="o")
    ax.set_xscale("log")
    ax.set_xlabel("number of adapters in the trace")
    ax.set_ylabel("tokens / s")
    ax.set_ylim(0, max(max(ys, default=0.0), 1.0) * 1.2)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ttft_by_tier(ttft_ms_by_tier: dict[str, list[float]], path: Path, title: str) -> None:
    """Box plot of TTFT per cache tier the request's adapter was found in."""
    plt = _pyplot()
    tiers = [t for t in ("none", "device", "host", "disk", "remote", "unknown") if ttft_ms_by_tier.get(t)]
    tiers += [t for t in sorted(ttft_ms_by_tier) if t not in tiers and ttft_ms_by_tier[t]]
    fig, ax = plt.subplots(figsize=(6, 4))
    if tiers:
        ax.boxplot([ttft_ms_by_tier[t] for t in tiers], whis=(1, 99), showfliers=True)
        ax.set_xticks(range(1, len(tiers) + 1), [f"{t}\n(n={len(ttft_ms_by_tier[t])})" for t in tiers])
    ax.set_yscale("log")
    ax.set_ylabel("TTFT (ms)")
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def update_results_md(path: Path, section: str, marker: str = MARKER) -> None:
    """Replaces this benchmark's section of RESULTS.md (between its markers), or appends it; the sections
    other benchmarks wrote are left as they are."""
    section_begin, section_end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    block = f"{section_begin}\n{section.rstrip()}\n{section_end}\n"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    begin, end = text.find(section_begin), text.find(section_end)
    if begin != -1 and end > begin:
        rest = text[end + len(section_end) :].lstrip("\n")
        text = text[:begin] + block + ("\n" + rest if rest else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


# ------------------------------------------------------------------------------------ the run's outputs

TABLE_HEADER = (
    "scenario",
    "system / setting",
    "workload",
    "tokens/s",
    "TTFT p50 ms",
    "TTFT p99 ms",
    "errors",
    "notes",
)


def _passes(tokens_per_s: list[float]) -> str:
    """ "; passes: a, b tokens/s" for more than one timed pass, else ""."""
    if len(tokens_per_s) < 2:
        return ""
    return "; passes: " + ", ".join(f"{x:.1f}" for x in tokens_per_s) + " tokens/s"


def summary_rows(results: dict) -> list[list]:
    """The rows of the one table, from the results dict `benchmarks.run` builds."""
    cfg = results["config"]
    rows: list[list] = []
    s1 = results.get("s1_openlora", {}).get("summary")
    if s1:
        rows.append(
            ["1 offline", "OpenLoRA", f"{s1['requests']} req, {s1['distinct_adapters']} adapters, t=0",
             s1["tokens_per_s"], s1["ttft_ms"]["p50"], s1["ttft_ms"]["p99"], s1["errors"],
             _tiers(s1) + _passes(results["s1_openlora"].get("passes_tokens_per_s", []))]
        )  # fmt: skip
    best = results.get("s1_peer")
    for p in results.get("s1_peer_sweep", []):
        is_best = best is not None and p["strategy"] == "batched" and p["batch_size"] == best["batch_size"]
        passes = best["passes_tokens_per_s"] if is_best else [p["tokens_per_s"]]
        workload = f"{p['num_requests']} req" + (
            " (prefix)" if p["num_requests"] < cfg["s1_requests"] else ""
        )
        rows.append(
            ["1 offline", f"PEFT {p['strategy']}, batch {p['batch_size']}" + (" (best)" if is_best else ""),
             workload, max(passes), None, None, 0,
             f"{p['computed_tokens']} tokens computed for {p['generated_tokens']} requested; "
             f"{p['adapters_loaded']} adapters loaded ({p['adapter_load_s']:.0f} s)"
             + (_passes(passes) if is_best else "")]
        )  # fmt: skip
    if s1 and best:
        # OpenLoRA's tokens/s is over the requests that succeeded (a failed one leaves its time to the rest)
        # and the peer fails whole: a failed request misses the target.
        ratio = s1["tokens_per_s"] / best["tokens_per_s"]
        rows.append(
            ["1 offline", f"OpenLoRA / PEFT batch {best['batch_size']}", "target >= 3x", ratio, None, None,
             s1["errors"], _met(ratio >= 3 and s1["errors"] == 0)]
        )  # fmt: skip
    runs = results.get("s2_capacity", [])
    bound = cfg.get("s2_ttft_p99_bound_ms", 0)
    for run in runs:
        top = _capacity_step(run)
        s = top["summary"] if top else None
        rows.append(
            [f"2 capacity, p99 <= {bound:.0f} ms", f"OpenLoRA, {run['num_adapters']} adapters",
             f"{run['capacity_rate_per_s']:.2f} req/s; {run['adapters_requested']} adapters requested over "
             f"{len(run['steps'])} steps", run["capacity_tokens_per_s"], s["ttft_ms"]["p50"] if s else None,
             s["ttft_ms"]["p99"] if s else None, sum(step["summary"]["errors"] for step in run["steps"]),
             _search(run)]
        )  # fmt: skip
    # The most adapters against the fewest, whatever order --s2-adapters gave the configurations in.
    fewest = min(runs, key=lambda run: run["num_adapters"], default=None)
    most = max(runs, key=lambda run: run["num_adapters"], default=None)
    if len(runs) >= 2 and fewest["capacity_rate_per_s"] > 0:
        ratio = most["capacity_rate_per_s"] / fewest["capacity_rate_per_s"]
        rows.append(
            ["2 capacity", f"{most['num_adapters']} / {fewest['num_adapters']} adapters", "target >= 0.8x",
             ratio, None, None, None, _met(ratio >= 0.8)]
        )  # fmt: skip
    s3 = results.get("s3_scale")
    if s3:
        s, rss, usage = s3["summary"], s3["worker_rss_mib"], s3["usage"]
        rows.append(
            ["3 scale", f"OpenLoRA, {cfg['num_adapter_slots']} slots",
             f"{s3['registered_adapters']} registered, {s3['distinct_adapters_touched']} touched, {s['requests']} req",
             s["tokens_per_s"], s["ttft_ms"]["p50"], s["ttft_ms"]["p99"], s["errors"],
             f"worker RSS {rss['first']:.0f} -> peak {rss['peak']:.0f} MiB (host tier cap "
             f"{s3.get('host_cache_mib', 0):.0f} MiB); usage {usage['recorded_requests']}/"
             f"{usage['expected_requests']} req, exactly once: {usage['exactly_once']}; {_tiers(s)}"]
        )  # fmt: skip
    for c in results.get("s4_cost", []):
        rows.append(
            ["4 cost", f"{c['num_adapters']} adapters at {c['rate_per_s']:.2f} req/s",
             f"{c['total_tokens']} tokens over {c['duration_s']:.0f} s", None, None, None, None,
             f"dedicated/shared = {c['ratio']:.1f}x: GPU-h per M tokens {c['dedicated_gpu_hours_per_million_tokens']:.3f} "
             f"({c['dedicated_replicas']} deployments) vs {c['shared_gpu_hours_per_million_tokens']:.3f} "
             f"({c['shared_replicas']} worker)"]
        )  # fmt: skip
    return rows


def _capacity_step(run: dict) -> dict | None:
    """The sustained step at the configuration's capacity rate, if any."""
    for step in run["steps"]:
        if step["sustained"] and step["rate_per_s"] == run["capacity_rate_per_s"]:
            return step
    return None


def _search(run: dict) -> str:
    """The steps of a capacity search as `rate ok|fail (TTFT p99, ITL p50, requests)`, in order."""
    steps = ", ".join(
        f"{step['rate_per_s']:.2f} {'ok' if step['sustained'] else 'fail'} "
        f"(TTFT p99 {_cell(step['summary']['ttft_ms']['p99'])} ms, "
        f"ITL p50 {_cell(step['summary']['itl_ms']['p50'])} ms, {step['summary']['requests']} req)"
        for step in run["steps"]
    )
    return steps + ("" if run["bracketed"] else "; not bracketed")


def _tiers(summary: dict) -> str:
    return ", ".join(f"{tier} {v['requests']}" for tier, v in summary.get("by_cache_tier", {}).items())


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def ttft_by_tier(results: dict) -> dict[str, list[float]]:
    """TTFT of every successful timed request of scenarios 2 (every step) and 3, grouped by cache tier (scenario 1 sends
    everything at t = 0, so its TTFT is queueing, whatever the tier)."""
    groups: dict[str, list[float]] = {}
    record_sets = [step.get("records", []) for run in results.get("s2_capacity", []) for step in run["steps"]]
    record_sets.append(results.get("s3_scale", {}).get("records", []))
    for records in record_sets:
        for r in records:
            if r.get("error") is None and r.get("ttft_ms") is not None:
                groups.setdefault(r.get("cache_tier") or "unknown", []).append(r["ttft_ms"])
    return groups


def write_outputs(results: dict, results_dir: Path, results_md: Path | None, marker: str = MARKER) -> str:
    """Writes the JSON files and plots, prints and returns the table, updates RESULTS.md when given."""
    import json

    gpu = results["config"].get("device", "cpu").startswith("cuda")
    suffix = ("-gpu" if gpu else "") + ("-quick" if results["config"].get("quick") else "")
    records = {}
    for key in ("s1_openlora", "s3_scale"):
        if key in results:
            records[key] = results[key].get("records", [])
    for run in results.get("s2_capacity", []):
        for i, step in enumerate(run["steps"]):
            records[f"s2_{run['num_adapters']}_step{i}"] = step.get("records", [])
    groups = ttft_by_tier(results)
    summary = _without_records(results)
    (results_dir / f"bench{suffix}.json").write_text(json.dumps(summary, indent=2))
    (results_dir / f"bench{suffix}-records.json").write_text(json.dumps(records))
    runs = results.get("s2_capacity", [])
    if runs:
        plot_throughput_vs_adapters(
            [(run["num_adapters"], run["capacity_tokens_per_s"]) for run in runs],
            results_dir / f"capacity_vs_adapters{suffix}.png",
            f"OpenLoRA capacity with TTFT p99 <= {results['config']['s2_ttft_p99_bound_ms']:.0f} ms",
        )
    if groups:
        plot_ttft_by_tier(
            groups, results_dir / f"ttft_by_cache_tier{suffix}.png", "TTFT by cache tier (scenarios 2 and 3)"
        )
    table = format_table(TABLE_HEADER, summary_rows(results))
    print(table)
    if results_md is not None:
        update_results_md(results_md, results_section(results, table), marker)
    return table


def _without_records(value):
    if isinstance(value, dict):
        return {k: _without_records(v) for k, v in value.items() if k != "records"}
    if isinstance(value, list):
        return [_without_records(v) for v in value]
    return value


def results_section(results: dict, table: str) -> str:
    cfg, machine, model = results["config"], results["machine"], results["model"]
    device = "on CPU" if cfg["device"] == "cpu" else f"on {cfg['device']}"
    lines = [
        "## Multi-adapter serving against the PEFT peer (issues 6 and 13)"
        + ("" if cfg["device"] == "cpu" else ", GPU"),
        "",
        f"Run {results['started_at']} on {machine['nproc']} CPUs ({machine['cpu_model']}, "
        f"{machine['memory_gib']} GiB), torch {machine['torch']} with {machine['torch_threads']} threads; "
        f"`{cfg['command'].strip()}` took {results['elapsed_s']:.0f} s. Model: a random-weight Llama of "
        f"{model['parameters_m']}M parameters (hidden {model['hidden_size']}, {model['num_layers']} layers, "
        f"vocab {model['vocab_size']}, {model['dtype']} {device}) written by transformers; adapters: rank "
        f"{model['adapter_rank']} on {', '.join(model['adapter_targets'])} ({model['adapter_dtype']} files), "
        "one written by peft and the rest cloned from its layout. Prompts "
        f"{cfg['prompt_len_range'][0]}-{cfg['prompt_len_range'][1]} tokens, "
        f"{cfg['output_len_range'][0]}-{cfg['output_len_range'][1]} generated tokens per request "
        f"(greedy, each request's length drawn from the range), power-law popularity alpha {cfg['alpha']}; the worker has {cfg['num_adapter_slots']} "
        f"adapter slots, max {cfg['max_num_seqs']} running sequences.",
        "",
        table,
        "",
    ]
    if "incomplete" in results:
        lines += [f"**This run stopped early** ({results['incomplete']}); the table holds what finished.", ""]
    return "\n".join(lines) + "\n" + results.get("notes", "")
