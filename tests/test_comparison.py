"""The answer of a comparison: statistics that are scipy's on the same numbers, Holm's correction,
and the verdicts."""

import numpy as np
import pytest
from scipy import stats

from companions.experiments import comparison


def test_the_statistics_are_scipys_on_the_same_numbers():
    baseline = [98.90, 99.02, 98.95, 98.99, 98.93]
    variant = [99.01, 99.05, 99.08, 99.02, 99.04]
    spread = comparison.spread(variant)
    assert spread["mean"] == pytest.approx(np.mean(variant)) and spread["sd"] == pytest.approx(np.std(variant, ddof=1))
    assert spread["median"] == 99.04
    assert spread["ci95"] == pytest.approx(stats.t.interval(0.95, 4, loc=np.mean(variant), scale=stats.sem(variant)))
    against = comparison.paired(baseline, variant)
    differences = np.subtract(variant, baseline)
    assert against["difference"] == pytest.approx(differences.mean())
    assert against["p_value"] == pytest.approx(stats.ttest_rel(variant, baseline).pvalue)
    assert against["difference_ci95"] == pytest.approx(
        stats.t.interval(0.95, 4, loc=differences.mean(), scale=stats.sem(differences))
    )
    # The difference a two-sided 5 % test finds with 80 % power: (t(0.975) + t(0.8)) standard errors.
    assert against["detectable_difference"] == pytest.approx((2.776445 + 0.940965) * stats.sem(differences), rel=1e-5)


def test_holm_multiplies_the_smallest_p_by_the_count_and_never_lets_a_larger_one_fall_below():
    assert comparison.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert comparison.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert comparison.holm([0.002]) == [0.002]


def test_a_difference_is_better_or_worse_only_below_five_percent_after_holm():
    assert comparison.verdict({"p_holm": 0.01, "difference": 0.2}, 5) == "better"
    assert comparison.verdict({"p_holm": 0.01, "difference": -0.2}, 5) == "worse"
    assert (
        comparison.verdict({"p_holm": 0.2, "difference": 0.2}, 5) == "not distinguishable from seed noise with 5 seeds"
    )
