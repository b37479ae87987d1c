"""Binary segmentation metrics (Dice, IoU, precision, recall) that say what they average.

In the 50 annotated MosMedData studies 62% of the axial slices hold no lesion, so *how* a Dice
score is averaged, and what an empty mask scores, changes it by more than the differences
between the models being compared. This module therefore offers the same scores three ways:

- **per study** (:func:`study_scores`): pooled over all voxels of one 3D study. The thesis'
  comparison of four U-Nets (test Dice "mean / max") is the mean and the maximum of these over the
  test studies, see :func:`evaluate_studies`.
- **per slice** (:func:`slice_dice`): one Dice per axial slice, then averaged over slices, with an
  explicit policy for slices whose ground truth is empty (:data:`EMPTY_POLICIES`).
- **pooled** (:func:`pooled_scores`): pooled over all voxels of many slices or studies, so that
  large lesions weigh more than small ones.

Conventions shared by every function:

- Dice is ``2 TP / (2 TP + FP + FN)`` (Dice 1945; Sorensen 1948), with the factor 2 that the
  thesis' printed formula lacks (without it, a perfect prediction would score 0.5).
  IoU is ``TP / (TP + FP + FN)``, precision ``TP / (TP + FP)``, recall ``TP / (TP + FN)``.
- A prediction is binarised as ``pred >= threshold`` (0.5 by default), the rule of
  segmentation_models_pytorch's ``metrics.get_stats``; a probability of exactly 0.5 (a logit of
  0) counts as lesion. Boolean predictions are used as they are. Ground truths must be {0, 1}.
- **Empty ground truth** (``TP + FN == 0``) scores the same for all four metrics, by policy:

  ==========  ===================  =======================
  ``empty``   empty prediction     non-empty prediction
  ==========  ===================  =======================
  ``"one"``   1.0                  0.0
  ``"zero"``  0.0                  0.0
  ``"skip"``  NaN (left out)       NaN (left out)
  ==========  ===================  =======================

  ``"one"`` is the thesis-style per-slice mean; ``"skip"`` is MiniSeg's protocol (Qiu et al.,
  AAAI 2021: Dice over the lesion slices only). MONAI's ``DiceMetric`` calls them
  ``ignore_empty=False`` and ``ignore_empty=True``.
- **Non-empty ground truth and an empty prediction** score 0.0 for all four metrics (precision's
  0/0 included): a missed lesion is never rewarded.
- Per-slice functions take stacks of slices along ``axis`` (default 0: shape ``(N, H, W)`` or
  ``(N, 1, H, W)``, as a DataLoader and a model produce them). Pass ``axis=-1`` for a volume in
  the working orientation ``(X, Y, Z)`` of :func:`covidseg.nifti.load_volume`.

The counts are taken with numpy rather than with ``smp.metrics.get_stats``: ``get_stats`` needs
``int64`` tensors of shape ``(N, 1, ...)`` (8 bytes a voxel, 80 MB for one 512 x 512 x 40 study
and each of its temporaries), while counting booleans with ``np.count_nonzero`` needs 1 byte a
voxel and is about ten times faster on such a study. The counts are the same (``int64``); ``tests/test_metrics.py`` checks them
against ``get_stats``.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .preprocessing import non_binary_values, show_values

__all__ = [
    "THRESHOLD",
    "EMPTY_POLICIES",
    "METRIC_NAMES",
    "confusion_counts",
    "dice",
    "iou",
    "precision",
    "recall",
    "scores",
    "study_scores",
    "slice_dice",
    "pooled_scores",
    "evaluate_studies",
]

THRESHOLD = 0.5
"""Default binarisation threshold: a voxel is lesion where ``pred >= THRESHOLD``."""

EMPTY_POLICIES = ("one", "skip", "zero")
"""What a case with an empty ground truth scores: ``"one"`` (1 if the prediction is empty too,
else 0), ``"skip"`` (NaN: left out of means), ``"zero"`` (always 0)."""

METRIC_NAMES = ("dice", "iou", "precision", "recall")
"""The scores returned by :func:`scores`, :func:`study_scores` and :func:`pooled_scores`."""


# --------------------------------------------------------------------------- inputs and counts


def _as_numpy(x: Any) -> np.ndarray:
    """A numpy view of an array or a (possibly CUDA, possibly grad-tracking) torch tensor."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = x.detach().cpu()
        try:
            x = x.numpy()
        except TypeError:  # bfloat16 and other dtypes numpy lacks
            x = x.float().numpy()
    return np.asarray(x)


def _binarise_pred(pred: Any, threshold: float) -> np.ndarray:
    pred = _as_numpy(pred)
    if pred.dtype == bool:
        return pred
    if pred.dtype.kind == "f" and np.isnan(pred).any():
        raise ValueError(f"prediction holds {int(np.isnan(pred).sum())} NaN values")
    return pred >= threshold


def _binarise_truth(truth: Any) -> np.ndarray:
    truth = _as_numpy(truth)
    if truth.dtype == bool:
        return truth
    extra = non_binary_values(truth)
    if extra.size:
        raise ValueError(f"ground truth must hold only 0 and 1, found {show_values(extra)} (is it a probability map?)")
    return truth > 0.5


def confusion_counts(pred: Any, truth: Any, threshold: float = THRESHOLD, axis: int | None = None):
    """True/false positive/negative voxel counts, pooled or per slice.

    Args:
        pred: Predictions, probabilities or binary, numpy array or torch tensor.
        truth: Ground truth of the same shape, values in {0, 1} (or boolean).
        threshold: A voxel is predicted lesion where ``pred >= threshold`` (as in smp's
            ``get_stats``). Ignored for boolean ``pred``.
        axis: ``None`` pools all voxels; an integer gives counts per index along that axis
            (the slice axis), pooling all the other axes.

    Returns:
        ``(tp, fp, fn, tn)``: ``int64`` scalars for ``axis=None``, else ``int64`` arrays of
        shape ``(N,)`` with ``N = pred.shape[axis]``.

    Shape:
        - pred, truth: any shape, the same for both, e.g. ``(N, H, W)``, ``(N, 1, H, W)`` or a
          volume ``(X, Y, Z)``.

    Raises:
        ValueError: If the shapes differ, ``truth`` is not binary or ``pred`` holds NaN.
    """
    p, t = _binarise_pred(pred, threshold), _binarise_truth(truth)
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {p.shape} differs from ground-truth shape {t.shape}")
    if axis is None:
        n = np.int64(p.size)
        tp = np.int64(np.count_nonzero(p & t))
        pos, ref = np.int64(np.count_nonzero(p)), np.int64(np.count_nonzero(t))
    else:
        if p.ndim == 0:
            raise ValueError("per-slice counts need at least one axis")
        p2 = np.moveaxis(p, axis, 0).reshape(p.shape[axis], -1)
        t2 = np.moveaxis(t, axis, 0).reshape(t.shape[axis], -1)
        n = np.int64(p2.shape[1])
        # A loop of whole-slice np.count_nonzero is ~4x faster than count_nonzero(axis=1).
        tp = np.fromiter((np.count_nonzero(a & b) for a, b in zip(p2, t2)), np.int64, len(p2))
        pos = np.fromiter((np.count_nonzero(a) for a in p2), np.int64, len(p2))
        ref = np.fromiter((np.count_nonzero(b) for b in t2), np.int64, len(t2))
    fp, fn = pos - tp, ref - tp
    return tp, fp, fn, n - tp - fp - fn


# --------------------------------------------------------------------------- primitives


def _check_policy(empty: str) -> None:
    if empty not in EMPTY_POLICIES:
        raise ValueError(f"unknown empty policy {empty!r}; valid policies: {', '.join(EMPTY_POLICIES)}")


def _ratio(num, den, tp, fp, fn, empty: str):
    """``num / den`` with the module's rules for empty truths and empty predictions."""
    _check_policy(empty)
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    tp, fp, fn = (np.asarray(v, dtype=np.int64) for v in (tp, fp, fn))
    with np.errstate(divide="ignore", invalid="ignore"):
        value = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    truth_empty = (tp + fn) == 0
    if empty == "one":
        empty_value = np.where(fp == 0, 1.0, 0.0)
    elif empty == "zero":
        empty_value = np.zeros_like(value)
    else:
        empty_value = np.full_like(value, np.nan)
    value = np.where(truth_empty, empty_value, value)
    return value[()] if value.ndim == 0 else value


def dice(tp, fp, fn, empty: str = "one"):
    """Dice coefficient ``2 TP / (2 TP + FP + FN)`` (the F1 score), elementwise.

    Args:
        tp, fp, fn: Counts (scalars or arrays of one shape), e.g. from :func:`confusion_counts`.
        empty: Score of an empty ground truth (``tp + fn == 0``): ``"one"`` gives 1.0 if the
            prediction is empty too (``fp == 0``) and 0.0 otherwise; ``"zero"`` gives 0.0;
            ``"skip"`` gives NaN. A non-empty truth with an empty prediction scores 0.0.

    Returns:
        A float (for scalar counts) or a float64 array.

    Raises:
        ValueError: For an unknown ``empty`` policy.
    """
    tp = np.asarray(tp, dtype=np.int64)
    return _ratio(2 * tp, 2 * tp + np.asarray(fp) + np.asarray(fn), tp, fp, fn, empty)


def iou(tp, fp, fn, empty: str = "one"):
    """Intersection over union (Jaccard index) ``TP / (TP + FP + FN)``, elementwise.

    ``iou = dice / (2 - dice)``. Empty cases score as in :func:`dice`.
    """
    tp = np.asarray(tp, dtype=np.int64)
    return _ratio(tp, tp + np.asarray(fp) + np.asarray(fn), tp, fp, fn, empty)


def precision(tp, fp, fn, empty: str = "one"):
    """Precision (positive predictive value) ``TP / (TP + FP)``, elementwise.

    An empty ground truth scores as in :func:`dice`; a non-empty ground truth with an empty
    prediction (0/0) scores 0.0.
    """
    tp = np.asarray(tp, dtype=np.int64)
    return _ratio(tp, tp + np.asarray(fp), tp, fp, fn, empty)


def recall(tp, fp, fn, empty: str = "one"):
    """Recall (sensitivity) ``TP / (TP + FN)``, elementwise. An empty ground truth scores as in
    :func:`dice`."""
    tp = np.asarray(tp, dtype=np.int64)
    return _ratio(tp, tp + np.asarray(fn), tp, fp, fn, empty)


_METRICS = {"dice": dice, "iou": iou, "precision": precision, "recall": recall}


def scores(tp, fp, fn, empty: str = "one") -> dict[str, float]:
    """Dice, IoU, precision and recall of scalar counts, as plain floats.

    Returns:
        ``{"dice", "iou", "precision", "recall"}``. Empty cases score as in :func:`dice`.
    """
    return {name: float(f(tp, fp, fn, empty)) for name, f in _METRICS.items()}


# --------------------------------------------------------------------------- three averagings


def study_scores(pred_volume: Any, truth_volume: Any, threshold: float = THRESHOLD, empty: str = "one") -> dict[str, float]:
    """Scores of one study, pooled over all of its voxels (3D Dice).

    Every voxel of the study counts once, whichever slice it is in. The thesis' "mean / max"
    test Dice of its four U-Nets is the mean and the maximum of this Dice over the test studies.

    Args:
        pred_volume: Predictions for the study, probabilities or binary.
        truth_volume: Its ground-truth mask, {0, 1}.
        threshold: Binarisation threshold, ``pred >= threshold``.
        empty: Score of a study without any lesion (see :func:`dice`). A study with a lesion and
            an empty prediction scores 0.0.

    Returns:
        ``{"dice", "iou", "precision", "recall"}`` as floats.

    Shape:
        - pred_volume, truth_volume: any shape, the same for both, e.g. ``(X, Y, Z)``.
    """
    tp, fp, fn, _ = confusion_counts(pred_volume, truth_volume, threshold)
    return scores(tp, fp, fn, empty)


def slice_dice(
    pred: Any,
    truth: Any,
    empty: str = "one",
    threshold: float = THRESHOLD,
    axis: int = 0,
    reduction: str = "none",
):
    """Dice of each slice (2D Dice), or its mean over slices.

    Every slice weighs the same, however small its lesion. Slices whose ground truth is empty
    score by ``empty``:

    - ``"one"``: 1.0 if the prediction is empty too, else 0.0 (the thesis-style per-slice mean;
      a model that predicts nothing scores the fraction of empty slices: 0.62 over the 50
      annotated MosMedData studies, 0.66 on the thesis' test split);
    - ``"skip"``: NaN, left out of the mean (MiniSeg's protocol: the mean over lesion slices,
      where an empty prediction scores 0.0);
    - ``"zero"``: 0.0.

    Args:
        pred: Predictions, probabilities or binary, slices along ``axis``.
        truth: Ground truth of the same shape, {0, 1}.
        empty: ``"one"``, ``"skip"`` or ``"zero"``.
        threshold: Binarisation threshold, ``pred >= threshold``.
        axis: The slice axis: 0 for a stack ``(N, H, W)`` / ``(N, 1, H, W)``, -1 for a volume
            ``(X, Y, Z)`` in the working orientation.
        reduction: ``"none"`` returns the per-slice Dice; ``"mean"`` returns its mean over the
            slices that are not skipped (NaN if every slice is skipped).

    Returns:
        A float64 array of shape ``(N,)`` (NaN for skipped slices), or a float for ``"mean"``.

    Shape:
        - pred, truth: ``(N, ...)`` with ``N`` slices along ``axis``.

    Raises:
        ValueError: For an unknown ``empty`` or ``reduction``, or mismatched shapes.
    """
    _check_policy(empty)
    if reduction not in ("none", "mean"):
        raise ValueError(f"unknown reduction {reduction!r}; valid reductions: none, mean")
    tp, fp, fn, _ = confusion_counts(pred, truth, threshold, axis=axis)
    per_slice = np.atleast_1d(dice(tp, fp, fn, empty))
    if reduction == "none":
        return per_slice
    return _nanmean(per_slice)


def pooled_scores(preds: Any, truths: Any, threshold: float = THRESHOLD, empty: str = "one") -> dict[str, float]:
    """Scores pooled over all voxels of many slices or studies.

    The counts of every voxel are summed before the ratio is taken, so a large lesion weighs
    more than a small one and empty slices add only their false positives.

    Args:
        preds: One array/tensor, or a sequence of them (e.g. one volume per study, of any
            shapes), of predictions.
        truths: The ground truths, matching ``preds`` one for one, {0, 1}.
        threshold: Binarisation threshold, ``pred >= threshold``.
        empty: Score when *every* ground truth is empty (see :func:`dice`).

    Returns:
        ``{"dice", "iou", "precision", "recall"}`` as floats.

    Raises:
        ValueError: If the sequences differ in length or a pair differs in shape.
    """
    if isinstance(preds, (list, tuple)) != isinstance(truths, (list, tuple)):
        raise ValueError("give both predictions and truths as arrays, or both as sequences")
    if not isinstance(preds, (list, tuple)):
        preds, truths = [preds], [truths]
    if len(preds) != len(truths):
        raise ValueError(f"{len(preds)} predictions but {len(truths)} ground truths")
    total = np.zeros(3, dtype=np.int64)
    for p, t in zip(preds, truths):
        total += np.array(confusion_counts(p, t, threshold)[:3], dtype=np.int64)
    return scores(*total, empty=empty)


# --------------------------------------------------------------------------- a test set


def _nanmean(values: np.ndarray) -> float:
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else float("nan")


def _summary(study_ids, counts, slice_counts, empty: str) -> dict[str, Any]:
    """Summary scores from per-study pooled counts and per-slice counts (all slices, all studies)."""
    per_study_dice = np.array([dice(*counts[i], empty=empty) for i in study_ids], dtype=np.float64)
    kept = per_study_dice[~np.isnan(per_study_dice)]
    tp, fp, fn = (np.concatenate([slice_counts[i][k] for i in study_ids]) for k in range(3))
    total = np.sum([counts[i] for i in study_ids], axis=0, dtype=np.int64)
    nan = float("nan")
    return {
        "mean_dice": float(kept.mean()) if kept.size else nan,
        "max_dice": float(kept.max()) if kept.size else nan,
        "min_dice": float(kept.min()) if kept.size else nan,
        "median_dice": float(np.median(kept)) if kept.size else nan,
        "pooled_dice": float(dice(*total, empty=empty)),
        "per_slice_dice_one": _nanmean(np.atleast_1d(dice(tp, fp, fn, "one"))),
        "per_slice_dice_skip": _nanmean(np.atleast_1d(dice(tp, fp, fn, "skip"))),
        "per_slice_dice_zero": _nanmean(np.atleast_1d(dice(tp, fp, fn, "zero"))),
        "lesion_slices_missed": int(np.count_nonzero((tp + fn > 0) & (tp + fp == 0))),
    }


def evaluate_studies(
    predictions: Mapping[Any, Any],
    truths: Mapping[Any, Any],
    threshold: float = THRESHOLD,
    axis: int = 0,
    empty: str = "one",
) -> dict[str, Any]:
    """Evaluate a test set of studies every way at once, with the predict-nothing baseline.

    Args:
        predictions: Study id -> predicted volume (probabilities or binary).
        truths: Study id -> ground-truth volume, {0, 1}; the same ids as ``predictions``.
        threshold: Binarisation threshold, ``pred >= threshold``.
        axis: The slice axis of the volumes: 0 for ``(N, H, W)`` stacks, -1 for ``(X, Y, Z)``
            volumes from :func:`covidseg.nifti.load_volume`.
        empty: Score of a study without any lesion in the per-study and pooled scores (see
            :func:`dice`). The per-slice means are given under every policy.

    Returns:
        A dict with

        - ``per_study``: id -> ``{"dice", "iou", "precision", "recall"}`` pooled over the
          study's voxels (:func:`study_scores`), plus ``"slices"`` and ``"lesion_slices"``;
        - ``n_studies``, ``n_slices``, ``n_lesion_slices``;
        - ``mean_dice``, ``max_dice``, ``min_dice``, ``median_dice``: over the per-study Dice
          (studies scored NaN under ``empty="skip"`` left out). The thesis' "mean / max";
        - ``pooled_dice``: Dice pooled over every voxel of every study (:func:`pooled_scores`);
        - ``per_slice_dice_one``, ``per_slice_dice_skip``, ``per_slice_dice_zero``: the mean of
          :func:`slice_dice` over every slice of every study (each slice weighs the same) under
          each empty-truth policy; ``_skip`` is the mean over lesion slices only;
        - ``lesion_slices_missed``: lesion slices whose prediction is empty (each scores 0);
        - ``baseline``: the same summary keys (without ``per_study`` and the counts) for a model
          that predicts nothing: per-study and pooled Dice 0 where there is a lesion,
          ``per_slice_dice_one`` the fraction of slices without lesion, ``_skip`` and ``_zero`` 0.

    Raises:
        ValueError: If the ids differ, or a prediction's shape differs from its truth's.

    Example::

        >>> import numpy as np
        >>> from covidseg.metrics import evaluate_studies
        >>> truth = np.zeros((2, 4, 4), dtype=np.uint8)  # a study of 2 slices of 4 x 4
        >>> truth[0, :2, :2] = 1  # a lesion of 4 voxels on slice 0; slice 1 has none
        >>> exact = 0.9 * truth  # probabilities
        >>> half = exact.copy()
        >>> half[0, 0, :2] = 0.2  # misses 2 of the 4 lesion voxels
        >>> report = evaluate_studies({255: exact, 256: half}, {255: truth, 256: truth})
        >>> print(f"{report['per_study'][256]['dice']:.3f}")  # 2 TP, 0 FP, 2 FN: 2*2 / (2*2 + 2)
        0.667
        >>> print(f"mean {report['mean_dice']:.3f}, max {report['max_dice']:.3f}")  # the thesis' "mean / max"
        mean 0.833, max 1.000
        >>> print(f"per slice: {report['per_slice_dice_one']:.3f} with empty slices, {report['per_slice_dice_skip']:.3f} without")
        per slice: 0.917 with empty slices, 0.833 without
    """
    _check_policy(empty)
    if not truths:
        raise ValueError("no studies to evaluate")
    if set(predictions) != set(truths):
        missing = sorted(set(truths) - set(predictions), key=str)
        extra = sorted(set(predictions) - set(truths), key=str)
        raise ValueError(f"study ids differ: no prediction for {missing}, no ground truth for {extra}")
    ids = sorted(truths, key=lambda i: (str(type(i)), i))
    counts, slices, base_counts, base_slices, per_study = {}, {}, {}, {}, {}
    for i in ids:
        tp, fp, fn, _ = confusion_counts(predictions[i], truths[i], threshold, axis=axis)
        slices[i] = (tp, fp, fn)
        counts[i] = np.array([tp.sum(), fp.sum(), fn.sum()], dtype=np.int64)
        zero = np.zeros_like(tp)
        base_slices[i] = (zero, zero, tp + fn)  # predict nothing: every lesion voxel is missed
        base_counts[i] = np.array([0, 0, counts[i][0] + counts[i][2]], dtype=np.int64)
        per_study[i] = scores(*counts[i], empty=empty)
        per_study[i]["slices"] = int(tp.size)
        per_study[i]["lesion_slices"] = int(np.count_nonzero(tp + fn))
    result: dict[str, Any] = {
        "per_study": per_study,
        "n_studies": len(ids),
        "n_slices": int(sum(per_study[i]["slices"] for i in ids)),
        "n_lesion_slices": int(sum(per_study[i]["lesion_slices"] for i in ids)),
    }
    result.update(_summary(ids, counts, slices, empty))
    result["baseline"] = _summary(ids, base_counts, base_slices, empty)
    return result
