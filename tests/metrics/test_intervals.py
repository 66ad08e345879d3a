"""Bootstrap intervals and the verdict rule: golden values, degenerate inputs, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest

from labkit.metrics.intervals import bootstrap_ci, paired_bootstrap, verdict

SAMPLE = [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]  # mean 5.0


def test_bootstrap_ci_of_a_known_sample_contains_its_mean():
    mean, low, high = bootstrap_ci(SAMPLE)
    assert mean == 5.0
    assert 3.5 < low < 5.0 < high < 6.5  # about mean -/+ 1.96 * sd / sqrt(n) = 5 -/+ 1.4


def test_bootstrap_ci_drops_nan_and_none_and_refuses_an_interval_for_one_unit():
    assert bootstrap_ci([*SAMPLE, float("nan"), None]) == bootstrap_ci(SAMPLE)
    mean, low, high = bootstrap_ci([3.0, float("nan")])
    assert mean == 3.0 and math.isnan(low) and math.isnan(high)
    assert all(math.isnan(v) for v in bootstrap_ci([]))


def test_identical_inputs_give_zero_difference_and_an_inconclusive_verdict():
    values = np.random.default_rng(1).normal(size=16)
    difference = values - values
    point, low, high = bootstrap_ci(difference)
    assert (point, low, high) == (0.0, 0.0, 0.0)
    assert verdict(low, high, +1) == "inconclusive" and verdict(low, high, -1) == "inconclusive"


def test_a_large_difference_is_reproduced_and_the_reverse_contradicted():
    noise = np.random.default_rng(2).normal(scale=0.1, size=16)
    difference = 2.0 + noise  # e.g. window NLL 3.0 - mm-sink NLL 1.0: positive, as the paper says
    _, low, high = bootstrap_ci(difference)
    assert 1.8 < low < high < 2.2
    assert verdict(low, high, +1) == "reproduced"
    _, low, high = bootstrap_ci(-difference)
    assert verdict(low, high, +1) == "contradicted" and verdict(low, high, -1) == "reproduced"


def test_verdict_needs_the_whole_interval_on_one_side():
    assert verdict(-0.1, 0.5, +1) == "inconclusive"
    assert verdict(0.0, 0.5, +1) == "inconclusive"  # touching 0 is not excluding it
    assert verdict(0.1, 0.5, -1) == "contradicted"
    assert verdict(float("nan"), 1.0, +1) == "inconclusive" and verdict(None, None, +1) == "inconclusive"
    with pytest.raises(ValueError):
        verdict(0.1, 0.5, 0)


def test_paired_bootstrap_of_a_mean_matches_bootstrap_ci_and_is_seeded():
    values = np.array(SAMPLE)
    assert paired_bootstrap(lambda idx: values[idx].mean(), len(values)) == bootstrap_ci(SAMPLE)
    assert paired_bootstrap(lambda idx: values[idx].mean(), len(values), seed=3) == bootstrap_ci(SAMPLE, seed=3)
    assert bootstrap_ci(SAMPLE, seed=3) != bootstrap_ci(SAMPLE, seed=4)
    point, low, high = paired_bootstrap(lambda idx: values[idx].mean(), 1)
    assert point == 2.0 and math.isnan(low) and math.isnan(high)


def test_paired_bootstrap_of_a_set_metric_resamples_units_for_both_sides():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(12, 5))
    b = a + 1.0  # every unit shifted: the paired difference of means is exactly 1 in every resample

    def difference(idx):
        return float(b[idx].mean() - a[idx].mean())

    point, low, high = paired_bootstrap(difference, 12)
    assert point == pytest.approx(1.0) and low == pytest.approx(1.0) and high == pytest.approx(1.0)
    assert verdict(low, high, +1) == "reproduced"


def test_bias_correction_brings_a_set_metric_back_around_its_point():
    # a statistic every resample inflates, as repeated units inflate a Fréchet distance: n / distinct units
    statistic = lambda idx: len(idx) / len(np.unique(idx))  # noqa: E731
    point, low, high = paired_bootstrap(statistic, 30, resamples=500, seed=1)
    assert point == 1.0 and low > point  # the plain percentile interval misses its own point
    point, low, high = paired_bootstrap(statistic, 30, resamples=500, seed=1, bias_corrected=True)
    assert low <= point <= high
