"""Figures: slices in radiological display, the thesis' slice grids, learning curves, histograms.

Slices are ``(H, W)`` arrays in the working orientation (H runs to the patient's left, W to
anterior; see :data:`covidseg.nifti.WORKING_ORIENTATION`). :func:`radiological` turns one into
the view radiologists use: anterior at the top, the patient's right on the viewer's left.

Importing this module does not change matplotlib's global state; every function draws on the axes
or figure it creates or is given.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

__all__ = [
    "radiological",
    "show_slice",
    "slice_grid",
    "comparison_grid",
    "learning_curve",
    "hu_histogram",
    "interval_plot",
]

CT_WINDOW = (-1.0, 1.0)
"""Display range of preprocessed slices (HU / 1000): the whole clipped window, as the model sees it."""

LUNG_WINDOW_HU = (-1350.0, 150.0)
"""The classic lung window (level -600, width 1500) in HU."""

TRUTH_COLOUR = (0.10, 0.85, 0.20)
PREDICTION_COLOUR = (0.95, 0.25, 0.10)


def radiological(slice_: np.ndarray) -> np.ndarray:
    """View of a working-orientation slice as radiologists display it.

    The working orientation is LAS: axis 0 runs to the patient's left, axis 1 to anterior.
    Transposing puts anterior along the rows and the left along the columns; flipping the rows puts
    anterior at the top. The patient's left then lies on the viewer's right.

    Shape:
        - Input: ``(H, W)`` = (left, anterior).
        - Output: ``(W, H)`` = (rows from anterior to posterior, columns from right to left).
    """
    return np.flipud(np.asarray(slice_).T)


def _overlay(ax, mask: np.ndarray, colour, alpha: float = 0.45) -> None:
    rgba = np.zeros(mask.shape + (4,), dtype=np.float32)
    rgba[..., :3] = colour
    rgba[..., 3] = alpha * (mask > 0)
    ax.imshow(rgba, interpolation="nearest")


def show_slice(ax, image: np.ndarray, mask: np.ndarray | None = None, colour=TRUTH_COLOUR, title: str | None = None, window=CT_WINDOW):
    """Draw one slice (and optionally a mask overlay) in radiological display on ``ax``."""
    ax.imshow(radiological(image), cmap="gray", vmin=window[0], vmax=window[1], interpolation="bilinear")
    if mask is not None:
        _overlay(ax, radiological(mask), colour)
    if title:
        ax.set_title(title, fontsize=9)
    ax.set_axis_off()
    return ax


def slice_grid(images: np.ndarray, predictions: np.ndarray, truths: np.ndarray, slices: Sequence[int], title: str | None = None):
    """The thesis' Figure 6.2-style grid: one row per slice, columns CT | prediction | truth.

    Args:
        images: ``(Z, H, W)`` preprocessed slices of one study.
        predictions: ``(Z, H, W)`` binary predicted masks.
        truths: ``(Z, H, W)`` binary expert masks.
        slices: Which slice indices to show (e.g. ``range(10, 20)``).
        title: Figure title (e.g. the study and model).

    Returns:
        The matplotlib ``Figure``.
    """
    import matplotlib.pyplot as plt

    slices = [k for k in slices if 0 <= k < images.shape[0]]
    fig, axes = plt.subplots(len(slices), 3, figsize=(6.6, 2.2 * len(slices)), squeeze=False)
    for row, k in zip(axes, slices):
        show_slice(row[0], images[k], title=f"CT, slice {k}")
        show_slice(row[1], images[k], predictions[k], PREDICTION_COLOUR, title="prediction")
        show_slice(row[2], images[k], truths[k], TRUTH_COLOUR, title="ground truth")
    _finish_grid(fig, title)
    return fig


def comparison_grid(images: np.ndarray, truths: np.ndarray, predictions: Mapping[str, np.ndarray], slices: Sequence[int], title: str | None = None):
    """The thesis' Figure 10.1: columns CT | truth | each model's prediction, same slices.

    Args:
        images: ``(Z, H, W)`` slices of one study.
        truths: ``(Z, H, W)`` expert masks.
        predictions: Model name -> ``(Z, H, W)`` predicted masks.
        slices: Slice indices, one row each.
        title: Figure title.

    Returns:
        The matplotlib ``Figure``.
    """
    import matplotlib.pyplot as plt

    slices = [k for k in slices if 0 <= k < images.shape[0]]
    columns = 2 + len(predictions)
    fig, axes = plt.subplots(len(slices), columns, figsize=(2.1 * columns, 2.2 * len(slices)), squeeze=False)
    for row, k in zip(axes, slices):
        show_slice(row[0], images[k], title=f"CT, slice {k}")
        show_slice(row[1], images[k], truths[k], TRUTH_COLOUR, title="ground truth")
        for ax, (name, masks) in zip(row[2:], predictions.items()):
            show_slice(ax, images[k], masks[k], PREDICTION_COLOUR, title=name)
    _finish_grid(fig, title)
    return fig


def _finish_grid(fig, title: str | None, title_inches: float = 0.4) -> None:
    """Lay out a grid of slices, keeping ``title_inches`` at the top for the title.

    ``tight_layout`` ignores a suptitle, which then overlaps the first row's panel titles.
    """
    if title:
        fig.suptitle(title, fontsize=11, y=1.0 - 0.08 / fig.get_figheight(), va="top")
    fig.tight_layout(rect=(0, 0, 1, 1.0 - title_inches / fig.get_figheight()) if title else None)


def learning_curve(history: Sequence[Mapping], title: str | None = None, best_epoch: int | None = None):
    """Training loss and validation per-study Dice by epoch (``history`` rows from :func:`covidseg.training.fit`).

    The y axis spans [0, 1], or up to the largest loss when it exceeds 1 (BCE + Dice can).
    """
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] + 1 for row in history]
    losses = [row["train_loss"] for row in history]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.plot(epochs, losses, "o-", label="training loss")
    ax.plot(epochs, [row["val_dice"] for row in history], "s-", label="validation per-study Dice")
    if best_epoch is not None and best_epoch >= 0:
        ax.axvline(best_epoch + 1, color="grey", linestyle=":", label="best epoch (kept)")
    ax.set_xlabel("epoch")
    ax.set_ylim(0, max([1.0, *losses]))
    ax.grid(alpha=0.3)
    ax.legend(loc="center right", fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def hu_histogram(hu_volume: np.ndarray, clip=(-1000.0, 1000.0), title: str | None = None):
    """Histogram of a study's Hounsfield units, with the clipping window marked."""
    import matplotlib.pyplot as plt

    values = np.asarray(hu_volume).ravel()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.hist(values, bins=np.linspace(min(values.min(), -1100), max(values.max(), 1100), 220), color="steelblue", log=True)
    for edge in clip:
        ax.axvline(edge, color="crimson", linestyle="--")
    ax.set_xlabel("Hounsfield units")
    ax.set_ylabel("voxels (log)")
    ax.set_title(title or "HU histogram; dashed: clipping window")
    fig.tight_layout()
    return fig


def interval_plot(
    intervals: Mapping[str, Sequence[float]],
    reference: Mapping[str, float] | None = None,
    reference_label: str = "thesis",
    interval_label: str = "estimate and 95% interval",
    null_value: float | None = None,
    xlabel: str = "mean per-study Dice",
    title: str | None = None,
):
    """Point estimates with confidence intervals, one row per name (a forest plot).

    Made for :func:`covidseg.stats.bootstrap_ci` and :func:`covidseg.stats.paired_bootstrap`
    results: each model's mean per-study Dice with its interval (thesis ch. 10), or each pair's
    mean difference with its interval and ``null_value=0``.

    Args:
        intervals: Name -> ``(estimate, low, high)``, drawn top to bottom in the given order.
        reference: Optional name -> value drawn as a cross on the same row (e.g. the thesis'
            mean Dice); names missing from it get no cross.
        reference_label: Legend label of the crosses.
        interval_label: Legend label of the estimates and their intervals.
        null_value: Optional x drawn as a dashed vertical line (e.g. 0 for "no difference").
        xlabel: Label of the x axis.
        title: Figure title.

    Returns:
        The matplotlib ``Figure``.

    Raises:
        ValueError: If ``intervals`` is empty or an entry is not ``low <= estimate <= high``.
    """
    import matplotlib.pyplot as plt

    if not intervals:
        raise ValueError("interval_plot needs at least one interval")
    names = list(intervals)
    values = np.array([[float(v) for v in intervals[name]] for name in names])
    if values.shape[1] != 3 or np.any(values[:, 1] > values[:, 0]) or np.any(values[:, 0] > values[:, 2]):
        raise ValueError("each interval must be (estimate, low, high) with low <= estimate <= high")
    rows = np.arange(len(names))[::-1]  # the first name on top
    label_inches = 0.085 * max(len(str(name)) for name in names)  # room for the row labels
    fig, ax = plt.subplots(figsize=(max(6.0, 4.0 + label_inches), 1.3 + 0.45 * len(names)))
    ax.errorbar(values[:, 0], rows, xerr=[values[:, 0] - values[:, 1], values[:, 2] - values[:, 0]], fmt="o",
                color="steelblue", ecolor="steelblue", capsize=4, label=interval_label)
    if reference:
        marked = [(value, row) for name, row in zip(names, rows) if (value := reference.get(name)) is not None]
        if marked:
            ax.plot(*zip(*marked), "x", color="crimson", markersize=8, label=reference_label)
    if null_value is not None:
        ax.axvline(null_value, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(rows, names)
    ax.set_ylim(-0.6, len(names) - 0.4)
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=2, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig
