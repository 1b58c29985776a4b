"""How far a mean over training seeds can be trusted: the Student-t interval that `comparison.png` draws over a
sweep's seeds and that the benchmark tables (`scripts/paired_seeds.py`) put on per-seed gaps."""

from __future__ import annotations

import math
import statistics

from scipy import stats

CONFIDENCE = 0.95


def t_interval(values: list[float], confidence: float = CONFIDENCE) -> tuple[float, float, float, float]:
    """(mean, sd, low, high): the Student-t interval for the mean of `values` (per-seed figures, or per-seed paired
    differences or ratios). With one value the spread is unknown: sd, low and high are NaN."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan, math.nan
    sd = statistics.stdev(values)
    half = stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * sd / math.sqrt(len(values))
    return mean, sd, mean - half, mean + half
