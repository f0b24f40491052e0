"""Statistics the benchmarks share."""

from __future__ import annotations

import random
import statistics


def median_summary(values: list[float], draws: int = 2000) -> dict:
    """Median and range of per-pass figures (ratios of two arms measured side by side in each pass), and the
    95% percentile bootstrap interval of that median (the passes resampled with replacement): the noise
    of the passes, stated beside the figure. One pass gives an interval of that one value."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(draws))
    interval = [medians[int(0.025 * draws)], medians[int(0.975 * draws) - 1]]
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "ci95": interval}
