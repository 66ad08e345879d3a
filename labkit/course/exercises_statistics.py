"""Exercises on how the report decides (notebooks 07 and 08): a paired bootstrap interval of a difference between two
policies, and the verdict rule that turns an interval into "reproduced", "contradicted" or "inconclusive".

References: `paired_bootstrap` and `verdict` in labkit/metrics/intervals.py, the functions every row and finding of
the report is computed with.
"""

from __future__ import annotations

import math

import numpy as np

from labkit.course.checks import Case, Exercise, Mistake, compare_equal, compare_numbers
from labkit.metrics.intervals import paired_bootstrap, verdict

# ---- 07: the paired bootstrap interval of a mean difference ----------------------------------------------------


def _bootstrap_reference(a: np.ndarray, b: np.ndarray, resamples: int, seed: int) -> tuple[float, float, float]:
    difference = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return paired_bootstrap(lambda index: float(difference[index].mean()), len(difference), resamples, seed)


def _bootstrap_cases() -> list[Case]:
    rng = np.random.default_rng(8)
    cases = []
    for n, shift, spread, resamples, seed in [
        (9, 0.3, 1.0, 2000, 0),
        (9, 0.0, 0.5, 1000, 1),
        (24, -0.2, 0.3, 2000, 2),
        (3, 1.0, 2.0, 500, 3),
    ]:
        story = rng.normal(0, spread, n)  # what the two policies share: each unit's own difficulty
        a, b = story + shift + rng.normal(0, 0.2, n), story + rng.normal(0, 0.2, n)
        cases.append(
            Case(
                f"{n} paired units, true difference {shift:+g}, {resamples} resamples, seed {seed}",
                (a, b, resamples, seed),
            )
        )
    return cases


def _bootstrap_unpaired(a, b, resamples, seed):
    rng = np.random.default_rng(seed)
    n = len(a)
    first, second = rng.integers(0, n, size=(resamples, n)), rng.integers(0, n, size=(resamples, n))
    values = a[first].mean(1) - b[second].mean(1)
    low, high = np.percentile(values, [2.5, 97.5])
    return float(np.mean(a - b)), float(low), float(high)


def _bootstrap_normal(a, b, resamples, seed):
    difference = a - b
    half = 1.96 * difference.std(ddof=1) / math.sqrt(len(difference))
    return float(difference.mean()), float(difference.mean() - half), float(difference.mean() + half)


PAIRED_BOOTSTRAP = Exercise(
    name="paired_bootstrap",
    notebook="07",
    title="a paired bootstrap interval of a difference between two policies",
    signature="`paired_bootstrap_interval(a, b, resamples, seed) -> (mean difference, low, high)`",
    reference=_bootstrap_reference,
    reference_name="labkit.metrics.intervals.paired_bootstrap",
    cases=_bootstrap_cases,
    compare=lambda got, expected: compare_numbers(
        got, expected, ("the mean difference", "the low bound", "the high bound")
    ),
    mistakes=(
        Mistake(
            "unpaired resampling",
            _bootstrap_unpaired,
            "resample *units*: one index array serves both policies (a[i] - b[i]), so the difficulty the two "
            "share cancels. Independent indices give a wider, unpaired interval.",
        ),
        Mistake(
            "a normal interval",
            _bootstrap_normal,
            "the lab's interval is the percentile bootstrap (2.5th and 97.5th percentiles of resampled means, "
            "drawn with np.random.default_rng(seed).integers(0, n, size=(resamples, n))), not mean +- 1.96 SE.",
        ),
    ),
)

# ---- 08: the verdict rule --------------------------------------------------------------------------------------


def _verdict_cases() -> list[Case]:
    rows = [
        (0.1, 0.5, 1),
        (0.1, 0.5, -1),
        (-0.3, 0.2, 1),
        (-0.5, -0.1, -1),
        (0.0, 0.4, 1),
        (-0.2, 0.0, -1),
        (0.0, 0.0, 1),
        (float("nan"), 0.3, 1),
        (None, None, -1),
        (-2.0, -1.0, 1),
    ]
    return [
        Case(
            f"interval [{low}, {high}] of a difference the paper says is {'positive' if d > 0 else 'negative'}",
            (low, high, d),
        )
        for low, high, d in rows
    ]


def _verdict_touching_zero(low, high, direction):
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return "inconclusive"
    low, high = sorted((low * direction, high * direction))
    return "reproduced" if low >= 0 else "contradicted" if high <= 0 else "inconclusive"


def _verdict_ignores_direction(low, high, direction):
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return "inconclusive"
    return "reproduced" if low > 0 or high < 0 else "inconclusive"


VERDICT_RULE = Exercise(
    name="verdict_rule",
    notebook="08",
    title="the verdict of an interval against the paper's direction",
    signature="`verdict(low, high, paper_direction) -> 'reproduced' | 'contradicted' | 'inconclusive'`",
    reference=verdict,
    reference_name="labkit.metrics.intervals.verdict",
    cases=_verdict_cases,
    compare=compare_equal,
    mistakes=(
        Mistake(
            "an interval touching 0 decides",
            _verdict_touching_zero,
            "an interval that touches 0 (such as [0, 0.4]) does not exclude 'no difference': inconclusive.",
        ),
        Mistake(
            "the direction ignored",
            _verdict_ignores_direction,
            "an interval wholly on the other side of 0 from the paper's direction contradicts it.",
        ),
    ),
)

STATISTICS_EXERCISES = (PAIRED_BOOTSTRAP, VERDICT_RULE)
