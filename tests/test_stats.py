"""Intervals, the exact paired test and Holm's correction, on cases worked out by hand."""

import itertools

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from covidseg.stats import compare_models, holm, mean_ci, paired_test, smallest_p_value


# --------------------------------------------------------------------------- the paired test


def test_smallest_p_for_10_pairs_is_2_in_1024():
    rng = np.random.default_rng(0)
    b = rng.uniform(0.4, 0.7, size=10)
    a = b + rng.uniform(0.05, 0.1, size=10)  # better on every study: the most extreme case
    result = paired_test(a, b)
    assert result["exact"] and result["n"] == 10
    # of the 1024 sign assignments only the observed one and its mirror are as extreme
    assert result["p_value"] == pytest.approx(2 / 1024) == smallest_p_value(10)
    assert smallest_p_value(10) == 1 / 512


def test_no_printed_p_is_below_what_10_pairs_allow():
    rng = np.random.default_rng(1)
    for _ in range(20):
        a, b = rng.random(10), rng.random(10)
        assert paired_test(a, b)["p_value"] >= 2 / 1024 - 1e-15


def test_sign_flip_p_by_enumeration():
    """The p-value is the share of the 2**n sign assignments whose |mean| is at least the observed."""
    diff = np.array([0.05, 0.02, -0.01, 0.04, 0.03, -0.02, 0.06])
    signs = np.array(list(itertools.product((1, -1), repeat=diff.size)))
    means = (signs * diff).mean(axis=1)
    by_hand = np.mean(np.abs(means) >= abs(diff.mean()) - 1e-12)
    assert paired_test(diff, np.zeros_like(diff))["p_value"] == pytest.approx(by_hand)


def test_interval_of_the_difference_is_students_t():
    a = np.array([0.7, 0.6, 0.75, 0.65, 0.8, 0.7, 0.55, 0.6, 0.9, 0.85])
    b = a - np.array([0.1, -0.1, 0.05, -0.05, 0.1, -0.1, 0.05, -0.05, 0.1, 0.0])
    d = a - b
    half = scipy_stats.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size)
    result = paired_test(a, b)
    assert result["mean_diff"] == pytest.approx(d.mean())
    assert (result["low"], result["high"]) == pytest.approx((d.mean() - half, d.mean() + half))
    assert result["low"] < 0 < result["high"] and result["p_value"] > 0.5


def test_identical_models_and_swapped_order():
    a = np.random.default_rng(7).random(10)
    assert paired_test(a, a) == {"mean_diff": 0.0, "low": 0.0, "high": 0.0, "p_value": 1.0, "exact": True, "n": 10}
    b = a[::-1].copy()
    ab, ba = paired_test(a, b), paired_test(b, a)
    assert ba["mean_diff"] == pytest.approx(-ab["mean_diff"])
    assert (ba["low"], ba["high"]) == pytest.approx((-ab["high"], -ab["low"]))
    assert ba["p_value"] == pytest.approx(ab["p_value"])


# --------------------------------------------------------------------------- Holm


def test_holm_by_hand():
    # sorted 0.01, 0.02, 0.04 times 3, 2, 1 -> 0.03, 0.04, 0.04 (made non-decreasing)
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1


def test_holm_adjusted_p_values_are_monotone_and_never_smaller():
    rng = np.random.default_rng(3)
    for _ in range(50):
        p = rng.random(6) ** 3
        adjusted = holm(p)
        order = np.argsort(p)
        assert np.all(np.diff(adjusted[order]) >= 0)  # same order as the raw p-values
        assert np.all(adjusted >= p) and np.all(adjusted <= 1)


def test_compare_models_adjusts_over_all_six_pairs():
    rng = np.random.default_rng(4)
    scores = {name: rng.uniform(0.4, 0.8, size=10) for name in ("a", "b", "c", "d")}
    results = compare_models(scores)
    assert list(results) == list(itertools.combinations(scores, 2))
    raw = [r["p_value"] for r in results.values()]
    assert [r["p_holm"] for r in results.values()] == pytest.approx(holm(raw).tolist())
    with pytest.raises(ValueError, match="at least two"):
        compare_models({"a": scores["a"]})


# --------------------------------------------------------------------------- intervals of a mean


def test_t_interval_by_hand():
    values = np.array([0.5, 0.6, 0.7])  # mean 0.6, s = 0.1, t_{2, 0.975} = 4.303
    mean, low, high = mean_ci(values)
    assert mean == pytest.approx(0.6)
    assert (low, high) == pytest.approx((0.6 - 4.3027 * 0.1 / np.sqrt(3), 0.6 + 4.3027 * 0.1 / np.sqrt(3)), abs=1e-4)


def test_bca_interval_is_seeded_and_close_to_t_for_a_large_sample():
    values = np.random.default_rng(5).normal(0.6, 0.1, size=200)
    mean, low, high = mean_ci(values, method="bca", seed=1)
    assert mean_ci(values, method="bca", seed=1) == (mean, low, high)
    _, t_low, t_high = mean_ci(values)
    assert (low, high) == pytest.approx((t_low, t_high), abs=0.003)


def test_constant_values_give_a_zero_width_interval():
    assert mean_ci([0.7] * 10) == pytest.approx((0.7, 0.7, 0.7))


def test_torch_values_are_accepted():
    values = [0.2, 0.4, 0.9]
    assert mean_ci(torch.tensor(values, dtype=torch.float64)) == mean_ci(values)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: mean_ci([]), "non-empty"),
        (lambda: mean_ci([[0.1, 0.2]]), "1D"),
        (lambda: mean_ci([0.1, float("nan")]), "NaN"),
        (lambda: mean_ci([0.1]), "at least 2"),
        (lambda: mean_ci([0.1, 0.2], confidence=1.0), "confidence"),
        (lambda: mean_ci([0.1, 0.2], method="percentile"), "valid methods"),
        (lambda: paired_test([0.1, 0.2], [0.1]), "same studies"),
        (lambda: holm([0.5, 1.5]), r"\[0, 1\]"),
    ],
)
def test_bad_input_is_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()
