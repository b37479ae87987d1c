"""Bootstrap intervals on cases whose answer can be worked out by hand."""

import numpy as np
import pytest
import torch

from covidseg.stats import bootstrap_ci, paired_bootstrap


def test_constant_values_give_a_zero_width_interval():
    mean, low, high = bootstrap_ci([0.7] * 10)
    assert mean == pytest.approx(0.7)
    assert low == high == pytest.approx(0.7)  # every resample is the same ten values
    assert bootstrap_ci([0.3]) == pytest.approx((0.3, 0.3, 0.3))  # one study


def test_two_values_by_hand():
    # Resamples of [0, 1] have mean 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4: each end
    # holds far more than 2.5%, so the 95% interval is [0, 1].
    assert bootstrap_ci([0.0, 1.0]) == (0.5, 0.0, 1.0)


def test_skewed_values_by_hand():
    # [0, 0, 0, 1]: a resample's mean is k/4 with k ~ Binomial(4, 1/4).
    # P(k = 0) = 0.316 > 2.5%, so low = 0; P(k = 4) = 0.004 < 2.5% < P(k >= 3) = 0.051, so high = 3/4.
    assert bootstrap_ci([0, 0, 0, 1]) == (0.25, 0.0, 0.75)


def test_interval_of_a_large_sample_matches_normal_theory():
    values = np.random.default_rng(5).normal(0.6, 0.1, size=400)
    mean, low, high = bootstrap_ci(values, n_boot=4000)
    half = 1.96 * values.std(ddof=1) / np.sqrt(values.size)  # 0.0098
    assert mean == pytest.approx(values.mean())
    assert low == pytest.approx(mean - half, abs=0.0015)
    assert high == pytest.approx(mean + half, abs=0.0015)


def test_a_higher_confidence_widens_the_interval():
    values = np.random.default_rng(2).random(10)
    _, low90, high90 = bootstrap_ci(values, confidence=0.90)
    _, low99, high99 = bootstrap_ci(values, confidence=0.99)
    assert low99 < low90 < high90 < high99


def test_deterministic_for_a_seed():
    values = np.random.default_rng(4).random(10)
    assert bootstrap_ci(values, seed=1) == bootstrap_ci(values, seed=1)
    assert bootstrap_ci(values, seed=1) != bootstrap_ci(values, seed=2)
    b = np.random.default_rng(6).random(10)
    assert paired_bootstrap(values, b, seed=3) == paired_bootstrap(values, b, seed=3)
    state = np.random.get_state()[1].copy()
    bootstrap_ci(values)
    assert (np.random.get_state()[1] == state).all()  # the global RNG is left alone


def test_a_clearly_better_model_excludes_zero():
    rng = np.random.default_rng(0)
    b = rng.uniform(0.5, 0.8, size=10)
    a = b + 0.1 + rng.uniform(-0.02, 0.02, size=10)  # better on every study, by 0.08 to 0.12
    result = paired_bootstrap(a, b)
    assert result["mean_diff"] == pytest.approx(np.mean(a - b))
    assert 0.08 <= result["low"] < result["mean_diff"] < result["high"] <= 0.12
    # no resampled mean difference is <= 0: p = 2 * (0 + 1) / (10000 + 1)
    assert result["p_value"] == pytest.approx(2 / 10001)


def test_noise_includes_zero():
    # differences of +-0.1 and +-0.05, half each way: no model is better
    a = np.array([0.7, 0.6, 0.75, 0.65, 0.8, 0.7, 0.55, 0.6, 0.9, 0.85])
    b = a + np.array([0.1, -0.1, 0.05, -0.05, 0.1, -0.1, 0.05, -0.05, 0.1, -0.1])
    result = paired_bootstrap(a, b)
    assert result["mean_diff"] == pytest.approx(0.0, abs=1e-12)
    assert result["low"] < 0 < result["high"]
    assert result["p_value"] > 0.5


def test_identical_models_and_swapped_order():
    a = np.random.default_rng(7).random(10)
    assert paired_bootstrap(a, a) == {"mean_diff": 0.0, "low": 0.0, "high": 0.0, "p_value": 1.0}
    b = a[::-1].copy()
    ab, ba = paired_bootstrap(a, b), paired_bootstrap(b, a)
    assert ba["mean_diff"] == pytest.approx(-ab["mean_diff"])
    assert (ba["low"], ba["high"]) == pytest.approx((-ab["high"], -ab["low"]))
    assert ba["p_value"] == pytest.approx(ab["p_value"])


def test_torch_values_are_accepted():
    values = [0.2, 0.4, 0.9]
    assert bootstrap_ci(torch.tensor(values, dtype=torch.float64)) == bootstrap_ci(values)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: bootstrap_ci([]), "non-empty"),
        (lambda: bootstrap_ci([[0.1, 0.2]]), "1D"),
        (lambda: bootstrap_ci([0.1, float("nan")]), "NaN"),
        (lambda: bootstrap_ci([0.1], confidence=1.0), "confidence"),
        (lambda: bootstrap_ci([0.1], n_boot=0), "n_boot"),
        (lambda: paired_bootstrap([0.1, 0.2], [0.1]), "same studies"),
    ],
)
def test_bad_input_is_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()
