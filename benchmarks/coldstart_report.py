"""Tables and the RESULTS.md section of the cold-start benchmark (`benchmarks/coldstart.py`)."""

from __future__ import annotations

from benchmarks.coldstart_trace import FIRST_CALL, LONG_TAIL, POPULAR, TAILS, TIERS


def pass_label(tail: str, hints_on: bool) -> str:
    return f"{tail}, hints {'on' if hints_on else 'off'}"


TABLE_HEADER = (
    "pass", "requests", "n", "TTFT p50 ms", "TTFT p99 ms", "warm TTFT p50 ms", "load p99 ms",
    "device / host / disk / remote", "warm",
)  # fmt: skip


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def table_rows(passes: dict[str, dict]) -> list[list]:
    rows = []
    for label, figures in passes.items():
        for kind in (POPULAR, LONG_TAIL):
            s = figures[kind]
            rows.append([
                label, kind.replace("_", "-"), s["requests"], _ms(s["ttft_ms"]["p50"]), _ms(s["ttft_ms"]["p99"]),
                _ms(s["warm_ttft_ms"]["p50"]), _ms(s["adapter_load_ms"]["p99"]),
                " / ".join(_share(s["tier_shares"][t]) for t in TIERS), _share(s["warm_share"]),
            ])  # fmt: skip
    return rows


DECILE_HEADER = (
    "tail", "decile", "adapters", "requests", "TTFT p50 ms on / off", "TTFT p99 ms on / off",
    "load p50 ms on / off", "load p99 ms on / off",
)  # fmt: skip


def decile_rows(passes: dict[str, dict]) -> list[list]:
    """Per tail, per popularity decile (1 = most requested adapters): hints on against off."""
    rows = []
    for tail in TAILS:
        on, off = passes.get(pass_label(tail, True)), passes.get(pass_label(tail, False))
        if on is None and off is None:
            continue
        some = on or off
        for i, d in enumerate(some["deciles"]):
            cells = []
            for metric, point in (("ttft_ms", "p50"), ("ttft_ms", "p99"), ("adapter_load_ms", "p50"),
                                  ("adapter_load_ms", "p99")):  # fmt: skip
                cells.append(" / ".join(_ms(p["deciles"][i][metric][point]) if p else "-" for p in (on, off)))
            rows.append([tail, d["decile"], d["adapters"], d["requests"], *cells])
    return rows


def pass_lines(label: str, figures: dict) -> list[str]:
    itl, first, prefetches = figures["itl"], figures[FIRST_CALL], figures.get("prefetches")
    wasted = (
        f"{prefetches['wasted']} of {prefetches['total']} ({prefetches['wasted_share']:.0%})"
        if prefetches is not None
        else "n/a (the worker exports no prefetch counters)"
        if figures.get("metrics_scraped")
        else "n/a (the worker's metrics endpoint did not answer)"
    )
    events = "; ".join(
        f"{event} {e['count']} (p50 {_ms(e['ms']['p50'])} ms)" for event, e in figures["worker_loads"].items()
    )
    ratio = "n/a" if itl["p99_ratio"] is None else f"{itl['p99_ratio']:.2f}"
    why = figures.get("why_cold")
    why_text = (
        "n/a"
        if why is None
        else ", ".join(f"{reason} {count}" for reason, count in why.items()) or "none was cold"
    )
    return [
        f"- {label}: first call ever {_ms(first['ttft_ms'])} ms from {first['tier'] or first['error']} "
        f"(load {_ms(first['adapter_load_ms'])} ms); ITL p99 while loads were in flight "
        f"{_ms(itl['during_loads_ms']['p99'])} ms ({itl['during_samples']} samples) against "
        f"{_ms(itl['no_load_ms']['p99'])} ms without ({itl['no_load_samples']}), ratio {ratio}, over "
        f"{itl['load_windows']} load windows of which {itl['prefetch_windows']} hint-driven prefetches; "
        f"wasted prefetches {wasted}; {figures['hints_published']} hint stream entries "
        f"({figures['hints_per_min']:.0f}/min); worker loads (cause/source->destination, whole pass): "
        f"{events or 'none'}; why measured long-tail calls were cold: {why_text}{_warm_breakdown(figures)}."
    ]


def _warm_breakdown(figures: dict) -> str:
    """The warm calls' p50 TTFT split as the worker saw it (queue, then its whole TTFT), popular against
    long tail; empty for figures written before these were recorded."""
    parts = []
    for kind, name in ((POPULAR, "popular"), (LONG_TAIL, "long tail")):
        kind_figures = figures.get(kind, {})
        queue, server = kind_figures.get("warm_queue_ms"), kind_figures.get("warm_server_ttft_ms")
        if queue is None or server is None:
            return ""
        parts.append(
            f"{name} client {_ms(kind_figures['warm_ttft_ms']['p50'])}, worker {_ms(server['p50'])}, "
            f"queue {_ms(queue['p50'])}"
        )
    return "; warm calls' TTFT p50 ms: " + "; ".join(parts)


def target_lines(results: dict) -> list[str]:
    names = {
        "long_tail_warm_share": "long-tail calls served from device or host",
        "long_tail_ttft_p99_vs_popular": "long-tail TTFT p99 / popular TTFT p99",
        "warm_long_tail_ttft_p50_minus_popular_ms": "warm long-tail TTFT p50 - popular TTFT p50 (ms)",
        "wasted_prefetch_share": "wasted prefetches / prefetches",
    }
    lines = []
    for tail, checked in results.get("targets", {}).items():
        off = results.get("targets_hints_off", {}).get(tail, {})
        for key, t in checked.items():
            value = "n/a" if t["value"] is None else f"{t['value']:.2f}"
            if t.get("ci95"):
                value += f" (95% CI {t['ci95'][0]:.2f} to {t['ci95'][1]:.2f})"
            if t.get("by_chance"):
                c = t["by_chance"]
                value += (
                    f" (the {c['sizes'][0]} and {c['sizes'][1]} calls dealt out at random: median "
                    f"{c['median']:.2f}, at or above the target {c['share_at_or_above_target']:.0%}, at or above "
                    f"this {c['p_value']:.0%})"
                )
            if off.get(key, {}).get("value") is not None:
                value += f" (hints off: {off[key]['value']:.2f})"
            if t.get("failed_calls"):
                value += f", {t['failed_calls']} measured calls failed"
            lines.append(f"- {tail}, hints on: {names[key]}: {value}, target {t['target']}: "
                         f"{'met' if t['met'] else 'MISSED'}")  # fmt: skip
    return lines


def results_section(results: dict, table: str, deciles: str) -> str:
    m, cfg, tc = results["machine"], results["config"], results["config"]["trace"]
    flags = " ".join(f"{flag} {value}" for flag, value in cfg["predictor_flags"])
    lines = [
        "## Cold start of the long tail (issues 7, 13, 15)",
        "",
        f"Run {results['started_at']} on {m['nproc']} CPUs ({m['cpu_model']}, {m['memory_gib']} GiB), torch "
        f"{m['torch']} with {m['torch_threads']} threads; `{cfg['command']}` took {results['elapsed_s']:.0f} s.",
        "",
        f"Trace: {tc['num_popular']} popular adapters (power law alpha {tc['alpha']}, Poisson "
        f"{tc['popular_rate_per_s']} requests/s) and {tc['num_long_tail']} long-tail adapters, each called once "
        f"per compressed hour of {tc['hour_s']} s on average: periodic (own phase, jitter up to "
        f"{tc['jitter_share'] * 60:.0f} minutes of the hour either way) or Poisson (memoryless); "
        f"{tc['num_history_hours']} history hours, then {tc['num_measured_hours']} measured hours; prompts "
        f"{tc['prompt_len_range'][0]}-{tc['prompt_len_range'][1]} tokens, {tc['output_len_range'][0]} generated. "
        f"`openlora up` per pass on a fresh database: {cfg['num_adapter_slots']} device slots, host budget "
        f"{results['num_host_adapters']} adapters = the {tc['num_popular']} popular ones and "
        f"{cfg['host_share']:.0%} of the long tail "
        f"({results['host_cache_bytes'] / (1 << 20):.0f} MiB), model {results['model']}, adapters rank 16 on "
        f"all projections. Hints on: `{flags}`; hints off: `--predictor-interval-s 0`. Figures over the "
        "measured hours only; tier shares of the requests served.",
        "",
        table,
        "",
        "TTFT and adapter-load time per popularity decile (adapters ranked by measured requests, 1 = most):",
        "",
        deciles,
        "",
        "Targets:",
        *target_lines(results),
        "",
        "Per pass:",
        *(line for label, f in results["passes"].items() for line in pass_lines(label, f)),
        "",
        "How it was measured: `openlora up` as a subprocess with the flags above (the worker's through "
        "`--worker-arg`), the adapters uploaded through `UploadAdapter`, the open-loop load generator "
        "(`benchmarks/load.py`) sharing the CPUs. TTFT is client-side from the scheduled arrival; tiers from "
        "the last message's `timing.cache_tier`. A request's load window is [arrival + queue_ms - "
        "adapter_load_ms, arrival + queue_ms]; a prefetch's is the read + copy time before the worker's log "
        "line for it; ITL samples overlapping either count as during loads.",
    ]
    return "\n".join(lines) + "\n"
