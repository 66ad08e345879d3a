"""Bootstrap confidence intervals and the verdict rule the report applies to them.

A finding of the report compares two policies (or two de-tokenizers) over the same *units*: one unit is one
(seed, story) continued by both, so the difference is paired unit by unit and the units are what is resampled.

- `bootstrap_ci`: percentile bootstrap of the mean of per-unit values (for example per-unit differences).
- `paired_bootstrap`: percentile bootstrap of any statistic of a unit subset (`statistic(indices) -> float`),
  for set metrics that are not means (a Fréchet distance) and for paired differences of them (evaluate both
  policies on the same resampled indices inside `statistic`); optionally bias-corrected (Fréchet distances).
- `verdict`: "reproduced" only if the whole interval lies on the paper's side of 0, "contradicted" if it lies
  wholly on the other side, "inconclusive" otherwise (an interval touching 0, or undefined).

Everything is seeded (`numpy.random.default_rng(seed)`) and keeps no state: the same call gives the same
interval. With few units (a handful of stories) the percentile bootstrap under-covers; the intervals are then
optimistic rather than conservative, which is one more reason the report needs many units before it says
"reproduced".
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

VERDICTS = ("reproduced", "contradicted", "inconclusive")


def _bounds(level: float) -> tuple[float, float]:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    tail = (1 - level) / 2 * 100
    return tail, 100 - tail


def bootstrap_ci(
    values: Sequence[float | None], resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `values` and its percentile-bootstrap interval at `level`.

    None and NaN values are dropped first. With no value left the result is (nan, nan, nan); with one value it
    is (value, nan, nan): one unit gives no interval. Identical values give the degenerate interval [v, v]."""
    kept = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if len(kept) == 0:
        return math.nan, math.nan, math.nan
    point = float(kept.mean())
    if len(kept) < 2:
        return point, math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = kept[rng.integers(0, len(kept), size=(resamples, len(kept)))].mean(axis=1)
    low, high = np.percentile(means, _bounds(level))
    return point, float(low), float(high)


def paired_bootstrap(
    statistic: Callable[[np.ndarray], float],
    n: int,
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    bias_corrected: bool = False,
) -> tuple[float, float, float]:
    """(point, low, high): `statistic` of all `n` units and its percentile-bootstrap interval at `level`.

    `statistic(indices)` receives an int array of unit indices (drawn with replacement; `arange(n)` for the
    point) and returns a float. For a paired difference, let it compute both sides on the same indices.
    Non-finite resampled statistics are dropped; n < 2 gives (point, nan, nan) (nan point when n == 0).

    `bias_corrected` shifts the interval down by the bootstrap's bias (mean resampled statistic - point). A
    Fréchet distance needs it: a resample repeats units, which narrows the generated features' spread, so every
    resampled distance sits above the full-sample one and the plain percentile interval can miss the point."""
    if n < 1:
        return math.nan, math.nan, math.nan
    point = float(statistic(np.arange(n)))
    if n < 2:
        return point, math.nan, math.nan
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(resamples, n))
    values = np.array([statistic(indices) for indices in draws], dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return point, math.nan, math.nan
    low, high = np.percentile(values, _bounds(level))
    if bias_corrected:
        bias = float(values.mean()) - point
        low, high = low - bias, high - bias
    return point, float(low), float(high)


def verdict(low: float | None, high: float | None, paper_direction: int) -> str:
    """ "reproduced", "contradicted" or "inconclusive" for an interval [low, high] of a difference.

    `paper_direction` is +1 if the paper says the difference is positive, -1 if negative. The interval must lie
    strictly on one side of 0 (an interval that touches 0, such as [0, 0], is inconclusive); None or NaN bounds
    are inconclusive."""
    if paper_direction not in (1, -1):
        raise ValueError(f"paper_direction must be +1 or -1, got {paper_direction!r}")
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return "inconclusive"
    if low > high:
        raise ValueError(f"interval bounds are reversed: [{low}, {high}]")
    signed_low, signed_high = sorted((low * paper_direction, high * paper_direction))
    if signed_low > 0:
        return "reproduced"
    if signed_high < 0:
        return "contradicted"
    return "inconclusive"
