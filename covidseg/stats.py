"""Bootstrap confidence intervals for comparing models on a handful of test studies.

A test set of 10 studies is small: one difficult study moves a mean Dice by several points. The
comparison chapter therefore reports each model's mean per-study Dice with a percentile
bootstrap interval over test studies (Efron & Tibshirani, *An Introduction to the Bootstrap*,
1993, ch. 13), and compares two models with a *paired* bootstrap over the same studies, which
removes the study-to-study variation that both models share.

The resampling unit is the study, never the slice: slices of one study are not independent.
Every function is deterministic for a given ``seed`` (a local ``numpy.random.default_rng``; the
global random state is neither read nor changed).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["N_BOOT", "CONFIDENCE", "bootstrap_ci", "paired_bootstrap"]

N_BOOT = 10_000
"""Default number of bootstrap resamples."""

CONFIDENCE = 0.95
"""Default confidence level of the intervals."""


def _values(values: Any, name: str) -> np.ndarray:
    if hasattr(values, "detach"):  # torch.Tensor
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1D sequence of per-study values, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds {int((~np.isfinite(array)).sum())} NaN or infinite values")
    return array


def _check(n_boot: int, confidence: float) -> None:
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence!r}")


def _boot_means(values: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Means of ``n_boot`` resamples (with replacement, same size) of ``values``."""
    rng = np.random.default_rng(seed)
    index = rng.integers(0, values.size, size=(int(n_boot), values.size))
    return values[index].mean(axis=1)


def _percentiles(boot: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(boot, [tail, 1.0 - tail])
    return float(low), float(high)


def bootstrap_ci(
    values: Any, n_boot: int = N_BOOT, confidence: float = CONFIDENCE, seed: int = 0
) -> tuple[float, float, float]:
    """Mean and percentile bootstrap confidence interval of per-study values.

    The studies are resampled with replacement ``n_boot`` times; the interval is the central
    ``confidence`` part of the resampled means (``np.quantile``, linear interpolation).

    Args:
        values: One value per test study, e.g. the per-study Dice of
            :func:`covidseg.metrics.evaluate_studies`.
        n_boot: Number of resamples.
        confidence: Coverage of the interval, in (0, 1).
        seed: Seed of the resampling; the same seed gives the same interval.

    Returns:
        ``(mean, low, high)``: the plain mean of ``values`` and the interval's bounds. Constant
        values (or a single study) give ``low == mean == high``.

    Raises:
        ValueError: If ``values`` is empty, not 1D, or holds NaN/inf, or an argument is out of
            range.
    """
    _check(n_boot, confidence)
    array = _values(values, "values")
    low, high = _percentiles(_boot_means(array, n_boot, seed), confidence)
    return float(array.mean()), low, high


def paired_bootstrap(
    a: Any, b: Any, n_boot: int = N_BOOT, confidence: float = CONFIDENCE, seed: int = 0
) -> dict[str, float]:
    """Paired bootstrap comparison of two models' per-study scores on the same studies.

    The differences ``a[i] - b[i]`` are resampled by study, so each resample keeps both models'
    scores of a study together.

    Args:
        a: Per-study scores of model A.
        b: Per-study scores of model B, for the same studies in the same order.
        n_boot: Number of resamples.
        confidence: Coverage of the interval, in (0, 1).
        seed: Seed of the resampling; the same seed gives the same result.

    Returns:
        ``{"mean_diff", "low", "high", "p_value"}``: the mean of ``a - b``, the percentile
        bootstrap interval of that mean, and a two-sided bootstrap p-value for "no difference":
        twice the smaller share of resampled mean differences on either side of 0 (each side
        counted with a +1 correction, ``(count + 1) / (n_boot + 1)``), capped at 1. It is
        below ``1 - confidence`` about when the interval excludes 0; identical scores give 1.

    Raises:
        ValueError: If ``a`` and ``b`` differ in length, are empty, or hold NaN/inf, or an
            argument is out of range.
    """
    _check(n_boot, confidence)
    a, b = _values(a, "a"), _values(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same studies: {a.size} values in a, {b.size} in b")
    diff = a - b
    boot = _boot_means(diff, n_boot, seed)
    low, high = _percentiles(boot, confidence)
    below = int(np.count_nonzero(boot <= 0.0)) + 1
    above = int(np.count_nonzero(boot >= 0.0)) + 1
    p_value = min(1.0, 2.0 * min(below, above) / (int(n_boot) + 1))
    return {"mean_diff": float(diff.mean()), "low": low, "high": high, "p_value": p_value}
