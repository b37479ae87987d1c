"""What a handful of test studies can say: intervals for a mean, exact paired tests, Holm's correction.

A test set of 10 studies is small: one difficult study moves a mean Dice by several points. The
comparison chapter therefore reports

- each model's mean per-study Dice with a Student *t* interval (or, on request, a BCa bootstrap
  interval, Efron & Tibshirani, *An Introduction to the Bootstrap*, 1993, ch. 14), both from
  :mod:`scipy.stats`;
- for two models scored on the same studies, the mean paired difference with its *t* interval and
  an **exact sign-flip permutation test** (Fisher, 1935; Good, *Permutation Tests*, 2000, ch. 3):
  under "no difference" each study's difference is as likely to have either sign, so the test
  enumerates all ``2**n`` sign assignments (1024 for 10 studies) with
  :func:`scipy.stats.permutation_test` (``permutation_type='samples'``). No random numbers are drawn,
  and no p-value below ``2 / 2**n`` (two-sided) can come out: with 10 studies, ``2/1024 = 1/512``;
- **Holm's step-down correction** (Holm, *Scand. J. Statist.* 6:65-70, 1979) over all pairs of
  models compared (six for four models), which keeps the chance of any false "difference" at the
  nominal level.

The unit is the study, never the slice: slices of one study are not independent.
"""

from __future__ import annotations

import itertools
from typing import Any, Mapping

import numpy as np
from scipy import stats

__all__ = [
    "CONFIDENCE",
    "EXACT_MAX_PAIRS",
    "mean_ci",
    "paired_test",
    "holm",
    "compare_models",
    "smallest_p_value",
]

CONFIDENCE = 0.95
"""Default confidence level of the intervals."""

EXACT_MAX_PAIRS = 20
"""Up to this many pairs the sign-flip test enumerates every assignment (2**20 ~ 1e6); beyond, it
draws ``N_RESAMPLES`` random ones (seeded)."""

N_RESAMPLES = 100_000
"""Random sign assignments drawn when there are more than :data:`EXACT_MAX_PAIRS` pairs."""


def _values(values: Any, name: str) -> np.ndarray:
    if hasattr(values, "detach"):  # torch.Tensor
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1D sequence of per-study values, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds {int((~np.isfinite(array)).sum())} NaN or infinite values")
    return array


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence!r}")


def mean_ci(values: Any, confidence: float = CONFIDENCE, method: str = "t", seed: int = 0) -> tuple[float, float, float]:
    """Mean of per-study values and its confidence interval.

    Args:
        values: One value per test study, e.g. the per-study Dice of
            :func:`covidseg.metrics.evaluate_studies`; at least 2.
        confidence: Coverage of the interval, in (0, 1).
        method: ``'t'``: Student's *t* interval, ``mean +- t_{n-1} * s / sqrt(n)``
            (:meth:`scipy.stats.ttest_1samp` ``.confidence_interval``); ``'bca'``: the
            bias-corrected and accelerated bootstrap (:func:`scipy.stats.bootstrap`, 9999
            resamples of the studies, seeded by ``seed``).
        seed: Seed of the BCa resampling (unused by ``'t'``).

    Returns:
        ``(mean, low, high)``. Constant values give ``low == mean == high``.

    Raises:
        ValueError: If ``values`` has fewer than 2 entries, is not 1D or holds NaN/inf, or
            ``confidence`` or ``method`` is invalid.
    """
    _check_confidence(confidence)
    array = _values(values, "values")
    if array.size < 2:
        raise ValueError(f"an interval needs at least 2 studies, got {array.size}")
    mean = float(array.mean())
    if np.ptp(array) == 0.0:
        return mean, mean, mean
    if method == "t":
        interval = stats.ttest_1samp(array, 0.0).confidence_interval(confidence_level=confidence)
    elif method == "bca":
        interval = stats.bootstrap(
            (array,), np.mean, confidence_level=confidence, method="BCa", n_resamples=9999, rng=np.random.default_rng(seed)
        ).confidence_interval
    else:
        raise ValueError(f"unknown method {method!r}; valid methods: t, bca")
    return mean, float(interval.low), float(interval.high)


def smallest_p_value(n_pairs: int) -> float:
    """The smallest two-sided p-value an exact sign-flip test on ``n_pairs`` pairs can give: ``2 / 2**n``."""
    return 2.0 / 2.0**n_pairs


def paired_test(a: Any, b: Any, confidence: float = CONFIDENCE, seed: int = 0) -> dict[str, Any]:
    """Compare two models' per-study scores on the same studies.

    Args:
        a: Per-study scores of model A.
        b: Per-study scores of model B, for the same studies in the same order.
        confidence: Coverage of the interval of the mean difference.
        seed: Seed of the random sign assignments, used only beyond :data:`EXACT_MAX_PAIRS` pairs.

    Returns:
        ``{"mean_diff", "low", "high", "p_value", "exact", "n"}``: the mean of ``a - b``, its *t*
        interval (:func:`mean_ci`), the two-sided p-value of the sign-flip permutation test of
        "no difference" (:func:`scipy.stats.permutation_test`, statistic: the mean difference;
        scipy counts the observed assignment, so ``p >= 2 / 2**n``), whether every assignment
        was enumerated, and the number of studies. Identical scores give ``p = 1``.

    Raises:
        ValueError: If ``a`` and ``b`` differ in length, have fewer than 2 studies, or hold
            NaN/inf.
    """
    _check_confidence(confidence)
    a, b = _values(a, "a"), _values(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same studies: {a.size} values in a, {b.size} in b")
    diff = a - b
    mean, low, high = mean_ci(diff, confidence)
    exact = diff.size <= EXACT_MAX_PAIRS
    if np.all(diff == 0.0):
        p_value = 1.0
    else:
        result = stats.permutation_test(
            (a, b),
            lambda x, y, axis: np.mean(x - y, axis=axis),
            permutation_type="samples",
            vectorized=True,
            n_resamples=np.inf if exact else N_RESAMPLES,
            alternative="two-sided",
            rng=np.random.default_rng(seed),
        )
        p_value = float(min(1.0, result.pvalue))
    return {"mean_diff": mean, "low": low, "high": high, "p_value": p_value, "exact": exact, "n": int(diff.size)}


def holm(p_values: Any) -> np.ndarray:
    """Holm's step-down adjustment of p-values for multiple comparisons.

    The ``i``-th smallest of ``m`` p-values is multiplied by ``m - i + 1`` (``i`` from 1), capped at
    1, and made non-decreasing in that order; rejecting every hypothesis whose adjusted p-value is
    below ``alpha`` controls the family-wise error rate at ``alpha`` (Holm, 1979).

    Args:
        p_values: ``(m,)`` p-values in [0, 1].

    Returns:
        ``(m,)`` adjusted p-values, in the input order; each is at least its raw p-value.

    Raises:
        ValueError: If a p-value lies outside [0, 1] or the input is empty or not 1D.
    """
    p = _values(p_values, "p_values")
    if np.any((p < 0.0) | (p > 1.0)):
        raise ValueError(f"p-values must lie in [0, 1], got {p.tolist()}")
    order = np.argsort(p, kind="stable")
    m = p.size
    stepped = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    adjusted = np.empty(m)
    adjusted[order] = stepped
    return adjusted


def compare_models(scores: Mapping[str, Any], confidence: float = CONFIDENCE) -> dict[tuple[str, str], dict[str, Any]]:
    """Every pair of models compared by :func:`paired_test`, with Holm-adjusted p-values.

    Args:
        scores: Model name -> per-study scores, all on the same studies in the same order.
        confidence: Coverage of the intervals.

    Returns:
        ``(first, second) -> paired_test(first, second)`` for every pair in
        ``itertools.combinations`` order, each with ``"p_holm"`` added (adjusted over all pairs).

    Raises:
        ValueError: If fewer than two models are given, or as :func:`paired_test`.
    """
    if len(scores) < 2:
        raise ValueError(f"comparing models needs at least two, got {len(scores)}")
    pairs = list(itertools.combinations(scores, 2))
    results = {(x, y): paired_test(scores[x], scores[y], confidence) for x, y in pairs}
    for pair, adjusted in zip(pairs, holm([results[pair]["p_value"] for pair in pairs])):
        results[pair]["p_holm"] = float(adjusted)
    return results
