"""Figures: slices in radiological display, the thesis' slice grids, learning curves, histograms.

Slices are ``(H, W)`` arrays in the working orientation (H runs to the patient's left, W to
anterior; see :data:`covidseg.nifti.WORKING_ORIENTATION`). :func:`radiological` turns one into
the view radiologists use: anterior at the top, the patient's right on the viewer's left.

Importing this module does not change matplotlib's global state; every function draws on the axes
or figure it creates or is given.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .preprocessing import HU_CLIP, scale_hu
from .sources import PHANTOM, REAL, data_source

__all__ = [
    "PHANTOM_STAMP",
    "data_of",
    "truth_label",
    "stamp",
    "radiological",
    "show_slice",
    "show_overlap",
    "slice_grid",
    "comparison_grid",
    "learning_curve",
    "hu_histogram",
    "interval_plot",
    "unet_shapes",
    "architecture_diagram",
]

CT_WINDOW = (scale_hu(HU_CLIP[0]), scale_hu(HU_CLIP[1]))
"""Display range of preprocessed slices (-1 to 1): the whole clipped window, as the model sees it."""

LUNG_WINDOW_HU = (-1350.0, 150.0)
"""The classic lung window (level -600, width 1500) in HU."""

LUNG_WINDOW = (scale_hu(LUNG_WINDOW_HU[0]), scale_hu(LUNG_WINDOW_HU[1]))
"""The lung window in the units of preprocessed slices (:func:`~covidseg.preprocessing.scale_hu`).
Preprocessing clips at -1000 HU, so air shows dark grey rather than black; ground glass
(-700 … -300 HU) spans a third of the grey scale here, against a fifth in :data:`CT_WINDOW`."""

TRUTH_COLOUR = (0.10, 0.85, 0.20)
PREDICTION_COLOUR = (0.95, 0.25, 0.10)
OVERLAP_COLOURS = {
    "true positive": (1.0, 0.85, 0.0),
    "false positive": (0.95, 0.15, 0.10),
    "false negative": (0.15, 0.55, 1.0),
}
"""Colours of :func:`show_overlap`: found lesion (yellow), false alarm (red), missed lesion (blue)."""

PHANTOM_STAMP = "SYNTHETIC PHANTOM"
"""Drawn inside every panel of a figure made from phantom data (:func:`stamp`)."""


def data_of(source) -> str:
    """Which data a figure shows: :data:`covidseg.sources.PHANTOM` or :data:`~covidseg.sources.REAL`.

    Args:
        source: What the data came from: a :class:`~covidseg.run_card.RunCard` or a report holding
            one (``report["run_card"]``), a chapter setup (anything with a ``source`` attribute),
            the strings ``'synthetic phantom'`` / ``'real MosMedData'``, or a dataset folder (a
            phantom folder holds :data:`covidseg.phantom.PHANTOM_MARKER`).

    Raises:
        ValueError: If ``source`` says neither.
    """
    if isinstance(source, Mapping):
        source = source.get("run_card", source).get("data")
    for attribute in ("data", "source"):
        value = getattr(source, attribute, None)
        if value in (PHANTOM, REAL):
            return value
    if source in (PHANTOM, REAL):
        return source
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        return data_source(source)
    raise ValueError(f"cannot tell the data of source {source!r}: give a run card, a chapter setup, a data folder, "
                     f"{PHANTOM!r} or {REAL!r}")


def truth_label(source) -> str:
    """What the reference masks are called: ``'phantom label'`` on the phantom, ``'expert mask'`` on real data."""
    return "phantom label" if data_of(source) == PHANTOM else "expert mask"


def stamp(ax, source) -> None:
    """Write :data:`PHANTOM_STAMP` inside ``ax`` (bottom right) when ``source`` is the phantom.

    Every figure builder of this module calls it on each of its panels, so a figure copied out of
    the book cannot pass for one of real CT.
    """
    if data_of(source) == PHANTOM:
        ax.text(0.98, 0.03, PHANTOM_STAMP, transform=ax.transAxes, ha="right", va="bottom", fontsize=8,
                fontweight="bold", color="black", zorder=10,
                bbox=dict(boxstyle="square,pad=0.2", facecolor=(1.0, 0.85, 0.0), edgecolor="none", alpha=0.85))


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


def show_slice(ax, image: np.ndarray, mask: np.ndarray | None = None, colour=TRUTH_COLOUR, title: str | None = None,
               window=CT_WINDOW, *, source):
    """Draw one slice (and optionally a mask overlay) in radiological display on ``ax``.

    Args:
        ax: Matplotlib axes.
        image: ``(H, W)`` slice in the working orientation.
        mask: Optional ``(H, W)`` binary mask, drawn in ``colour``.
        colour: RGB of the mask.
        title: Panel title.
        window: ``(low, high)`` display range in the image's units (:data:`LUNG_WINDOW_HU` for HU,
            :data:`LUNG_WINDOW` for preprocessed slices).
        source: What the data came from (see :func:`data_of`); the phantom is stamped.
    """
    ax.imshow(radiological(image), cmap="gray", vmin=window[0], vmax=window[1], interpolation="bilinear")
    if mask is not None:
        _overlay(ax, radiological(mask), colour)
    if title:
        ax.set_title(title, fontsize=11)
    ax.set_axis_off()
    stamp(ax, source)
    return ax


def show_overlap(ax, image: np.ndarray, prediction: np.ndarray, truth: np.ndarray, title: str | None = None,
                 window=LUNG_WINDOW, *, source):
    """One panel with prediction and reference together: true positives, false positives and false
    negatives in the colours of :data:`OVERLAP_COLOURS`, over the slice in radiological display.

    Args:
        ax: Matplotlib axes.
        image: ``(H, W)`` slice in the working orientation.
        prediction: ``(H, W)`` binary predicted mask.
        truth: ``(H, W)`` binary reference mask.
        title: Panel title.
        window: Display range in the image's units.
        source: What the data came from (see :func:`data_of`); the phantom is stamped.
    """
    predicted, true = np.asarray(prediction) > 0, np.asarray(truth) > 0
    show_slice(ax, image, title=title, window=window, source=source)
    for region, name in ((predicted & true, "true positive"), (predicted & ~true, "false positive"),
                         (~predicted & true, "false negative")):
        _overlay(ax, radiological(region), OVERLAP_COLOURS[name], alpha=0.7)
    return ax


def _overlap_legend(fig, source) -> None:
    from matplotlib.patches import Patch

    names = {"true positive": "found", "false positive": "false positive", "false negative": "missed"}
    handles = [Patch(color=OVERLAP_COLOURS[key], label=label) for key, label in names.items()]
    fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=10, frameon=False,
               title=f"prediction against the {truth_label(source)}", title_fontsize=10)


GRID_PANEL_INCHES = (2.6, 2.85)
"""Width and height of one panel of a slice grid (its title included), in inches."""

GRID_MIN_WIDTH_INCHES = 4.0
"""Narrowest slice grid: room for the legend below it (three entries a row) when it has one column."""


def _grid(rows: int, columns: int):
    """A figure of ``rows x columns`` panels with matplotlib's constrained layout, and room below
    for the legend: ``(fig, axes)``, ``axes`` of shape ``(rows, columns)``."""
    import matplotlib.pyplot as plt

    width, height = GRID_PANEL_INCHES
    return plt.subplots(rows, columns, figsize=(max(width * columns, GRID_MIN_WIDTH_INCHES), height * rows + 0.9),
                        squeeze=False, layout="constrained")


def slice_grid(images: np.ndarray, predictions: np.ndarray, truths: np.ndarray, slices: Sequence[int],
               title: str | None = None, columns: int = 3, window=LUNG_WINDOW, *, source):
    """The thesis' Figure 6.2-style slices of one study, one panel per slice: prediction and
    reference in one panel (:func:`show_overlap`), in the lung window, ``columns`` panels a row.

    Args:
        images: ``(Z, H, W)`` preprocessed slices of one study.
        predictions: ``(Z, H, W)`` binary predicted masks.
        truths: ``(Z, H, W)`` binary reference masks.
        slices: Which slice indices to show (e.g. ``range(12, 24, 2)``); missing ones are skipped.
        title: Figure title (e.g. the study and model).
        columns: Panels per row.
        window: Display range in the images' units.
        source: What the data came from (see :func:`data_of`); phantom panels are stamped and the
            reference is called "phantom label".

    Returns:
        The matplotlib ``Figure``.
    """
    slices = [k for k in slices if 0 <= k < images.shape[0]]
    columns = max(1, min(columns, len(slices)))
    rows = -(-len(slices) // columns)
    fig, axes = _grid(rows, columns)
    for ax, k in zip(axes.flat, slices):
        show_overlap(ax, images[k], predictions[k], truths[k], title=f"slice {k}", window=window, source=source)
    for ax in axes.flat[len(slices):]:
        ax.set_axis_off()
    _overlap_legend(fig, source)
    _finish_grid(fig, title)
    return fig


def comparison_grid(images: np.ndarray, truths: np.ndarray, predictions: Mapping[str, np.ndarray], slices: Sequence[int],
                    title: str | None = None, window=LUNG_WINDOW, *, source):
    """The thesis' Figure 10.1: one column per slice; the CT in the first row, then one row per
    model with its prediction against the reference (:func:`show_overlap`), all in the lung window.
    Few columns keep the panels large at a page's width.

    Args:
        images: ``(Z, H, W)`` slices of one study.
        truths: ``(Z, H, W)`` reference masks.
        predictions: Model name -> ``(Z, H, W)`` predicted masks.
        slices: Slice indices, one column each (two or three keep the panels large).
        title: Figure title.
        window: Display range in the images' units.
        source: What the data came from (see :func:`data_of`).

    Returns:
        The matplotlib ``Figure``.
    """
    slices = [k for k in slices if 0 <= k < images.shape[0]]
    fig, axes = _grid(1 + len(predictions), len(slices))
    for column, k in zip(axes.T, slices):
        show_slice(column[0], images[k], title=f"CT, slice {k}", window=window, source=source)
        for ax, (name, masks) in zip(column[1:], predictions.items()):
            show_overlap(ax, images[k], masks[k], truths[k], title=f"{name}, slice {k}", window=window, source=source)
    _overlap_legend(fig, source)
    _finish_grid(fig, title)
    return fig


def _finish_grid(fig, title: str | None) -> None:
    """Title a grid of slices; its constrained layout keeps the title, the panel titles and the
    legend below from overlapping."""
    if title:
        fig.suptitle(title, fontsize=12)


def learning_curve(history: Sequence[Mapping], title: str | None = None, best_epoch: int | None = None, *, source):
    """Training loss and validation per-study Dice by epoch (``history`` rows from :func:`covidseg.training.fit`).

    The y axis spans [0, 1], or up to the largest loss when it exceeds 1 (BCE + Dice can); epochs
    are whole-number ticks counted from 1; the legend sits below the axes, off the data.

    Args:
        history: One mapping per epoch with ``epoch`` (from 0), ``train_loss`` and ``val_dice``.
        title: Axes title.
        best_epoch: The kept epoch (from 0), drawn as a dotted line.
        source: What the data came from (see :func:`data_of`); the phantom is stamped.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] + 1 for row in history]
    losses = [row["train_loss"] for row in history]
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    ax.plot(epochs, losses, "o-", label="training loss")
    ax.plot(epochs, [row["val_dice"] for row in history], "s-", label="validation per-study Dice")
    if best_epoch is not None and best_epoch >= 0:
        ax.axvline(best_epoch + 1, color="grey", linestyle=":", label="best epoch (kept)")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0, max([1.0, *losses]))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3, fontsize=9, frameon=False)
    if title:
        ax.set_title(title, fontsize=11)
    stamp(ax, source)
    return fig


def hu_histogram(hu_volume: np.ndarray, clip=HU_CLIP, title: str | None = None, *, source):
    """Histogram of a study's Hounsfield units, with the clipping window marked (``source``: see :func:`data_of`)."""
    import matplotlib.pyplot as plt

    values = np.asarray(hu_volume).ravel()
    fig, ax = plt.subplots(figsize=(6, 3.2), layout="constrained")
    ax.hist(values, bins=np.linspace(min(values.min(), -1100), max(values.max(), 1100), 220), color="steelblue", log=True)
    for edge in clip:
        ax.axvline(edge, color="crimson", linestyle="--")
    ax.set_xlabel("Hounsfield units")
    ax.set_ylabel("voxels (log)")
    ax.set_title(title or "HU histogram; dashed: clipping window")
    stamp(ax, source)
    return fig


def interval_plot(
    intervals: Mapping[str, Sequence[float]],
    reference: Mapping[str, float] | None = None,
    reference_label: str = "thesis",
    interval_label: str = "estimate and 95% interval",
    null_value: float | None = None,
    xlabel: str = "mean per-study Dice",
    title: str | None = None,
    *,
    source,
):
    """Point estimates with confidence intervals, one row per name (a forest plot).

    Made for :func:`covidseg.stats.mean_ci` and :func:`covidseg.stats.paired_test` results:
    each model's mean per-study Dice with its interval (thesis ch. 10), or each pair's mean
    difference with its interval and ``null_value=0``.

    Args:
        intervals: Name -> ``(estimate, low, high)``, drawn top to bottom in the given order.
        reference: Optional name -> value drawn as a cross on the same row (e.g. the thesis'
            mean Dice); names missing from it get no cross. Refused on phantom data: a real
            result drawn beside a phantom one would look comparable.
        reference_label: Legend label of the crosses.
        interval_label: Legend label of the estimates and their intervals.
        null_value: Optional x drawn as a dashed vertical line (e.g. 0 for "no difference").
        xlabel: Label of the x axis.
        title: Figure title.
        source: What the data came from (see :func:`data_of`); the phantom is stamped.

    Returns:
        The matplotlib ``Figure``.

    Raises:
        ValueError: If ``intervals`` is empty, an entry is not ``low <= estimate <= high``, or a
            ``reference`` is given for phantom data.
    """
    import matplotlib.pyplot as plt

    if reference and data_of(source) == PHANTOM:
        raise ValueError("reference values (real results) cannot be drawn beside phantom results")
    if not intervals:
        raise ValueError("interval_plot needs at least one interval")
    names = list(intervals)
    values = np.array([[float(v) for v in intervals[name]] for name in names])
    if values.shape[1] != 3 or np.any(values[:, 1] > values[:, 0]) or np.any(values[:, 0] > values[:, 2]):
        raise ValueError("each interval must be (estimate, low, high) with low <= estimate <= high")
    rows = np.arange(len(names))[::-1]  # the first name on top
    label_inches = 0.085 * max(len(str(name)) for name in names)  # room for the row labels
    fig, ax = plt.subplots(figsize=(max(6.0, 4.0 + label_inches), 1.3 + 0.45 * len(names)), layout="constrained")
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
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=2, fontsize=9, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    stamp(ax, source)
    return fig


def unet_shapes(model, image_size: int = 512) -> dict:
    """The feature maps a U-Net computes, measured by running it on an empty ``(1, C, S, S)`` slice
    on PyTorch's ``meta`` device (shapes only: no memory for values, no arithmetic).

    Works for :class:`covidseg.models.UNet` (``down``/``up`` blocks) and for smp's ``Unet``
    (``encoder``/``decoder``), whose decoder drops the encoder's first, stride-1 feature map
    (``features[1:]`` in ``UnetDecoder.forward``) and whose last block has no skip.

    Args:
        model: The network; it is not changed (a copy goes to the meta device).
        image_size: Height and width of the slice, in pixels.

    Returns:
        ``{"input": (C, S, S), "encoder": [(C, H, W), ...] shallow to deep (the last is the
        bottleneck), "decoder": [(C, H, W), ...] deep to shallow, "skips": [encoder index or None
        for each decoder block], "unused": [encoder indices computed but never passed on]}``.
    """
    import copy

    import torch

    net = copy.deepcopy(model).to("meta").eval()
    first = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    x = torch.zeros(1, first.in_channels, image_size, image_size, device="meta")
    decoder_out: list = []
    with torch.no_grad():
        if hasattr(net, "encoder") and hasattr(net, "decoder"):  # smp
            encoder = [tuple(f.shape[1:]) for f in net.encoder(x)]
            hooks = [b.register_forward_hook(lambda m, a, out: decoder_out.append(tuple(out.shape[1:]))) for b in net.decoder.blocks]
            net(x)
            n = len(net.decoder.blocks)
            skips = [len(encoder) - 2 - i if len(encoder) - 2 - i >= 1 else None for i in range(n)]
            unused = [0] if encoder[0][0] != first.in_channels else []  # the stride-1 map, if computed
        else:  # covidseg.models.UNet
            encoder = []
            hooks = [b.register_forward_hook(lambda m, a, out: encoder.append(tuple(out.shape[1:]))) for b in net.down]
            hooks += [b.register_forward_hook(lambda m, a, out: decoder_out.append(tuple(out.shape[1:]))) for b in net.up]
            net(x)
            skips = [len(encoder) - 2 - i for i in range(len(net.up))]
            unused = []
    for hook in hooks:
        hook.remove()
    return {"input": tuple(x.shape[1:]), "encoder": encoder, "decoder": decoder_out, "skips": skips, "unused": unused}


def architecture_diagram(model, title: str, image_size: int = 512, ax=None):
    """A U-shaped diagram of a U-Net drawn from its real feature-map shapes (:func:`unet_shapes`).

    The encoder descends on the left, the decoder climbs on the right; each box is one feature map,
    labelled ``channels x height`` (maps are square), its width growing with the log of the channels.
    Horizontal arrows are the skip connections; a computed encoder map that the decoder never uses
    is drawn with a dashed, crossed-out arrow.

    Args:
        model: A :class:`covidseg.models.UNet` or an smp ``Unet``.
        title: Axes title.
        image_size: Slice size the shapes are computed for.
        ax: Axes to draw on; a new figure if ``None``.

    Returns:
        The matplotlib ``Figure``.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    shapes = unet_shapes(model, image_size)
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 5.2), layout="constrained")
    fig = ax.figure

    def level(shape):  # 0 at full resolution, 1 at stride 2, ...
        return int(round(np.log2(image_size / shape[1])))

    def box(x, shape, colour):
        y = -level(shape)
        width = 0.25 + 0.12 * np.log2(shape[0])
        ax.add_patch(FancyBboxPatch((x - width / 2, y - 0.3), width, 0.6, boxstyle="round,pad=0.02",
                                    facecolor=colour, edgecolor="black", linewidth=0.8))
        ax.text(x, y, f"{shape[0]} × {shape[1]}", ha="center", va="center", fontsize=9)
        return x, y, width

    encoder = [box(0.0, s, (0.75, 0.85, 1.0)) for s in shapes["encoder"]]
    decoder = [box(3.4, s, (1.0, 0.85, 0.7)) for s in shapes["decoder"]]
    arrow = dict(arrowstyle="-|>", color="black", linewidth=0.9)
    for (x0, y0, w0), (x1, y1, w1) in zip(encoder, encoder[1:]):
        ax.annotate("", (x1, y1 + 0.3), (x0, y0 - 0.3), arrowprops=arrow)
    (xb, yb, wb), (x1, y1, w1) = encoder[-1], decoder[0]
    ax.annotate("", (x1, y1 - 0.3), (xb + wb / 2, yb), arrowprops=arrow)  # the bottleneck feeds the decoder
    for (x0, y0, w0), (x1, y1, w1) in zip(decoder, decoder[1:]):
        ax.annotate("", (x1, y1 - 0.3), (x0, y0 + 0.3), arrowprops=arrow)
    for target, source in zip(decoder, shapes["skips"]):
        if source is not None:
            x0, y0, w0 = encoder[source]
            ax.annotate("", (target[0] - target[2] / 2, target[1] + 0.12), (x0 + w0 / 2, y0 + 0.12),
                        arrowprops=dict(arrowstyle="-|>", color="tab:green", linewidth=1.4))
    for index in shapes["unused"]:
        x0, y0, w0 = encoder[index]
        ax.annotate("", (2.1, y0), (x0 + w0 / 2, y0), arrowprops=dict(arrowstyle="-", color="grey", linestyle="--"))
        ax.text(2.15, y0, "✗ unused", ha="left", va="center", fontsize=9, color="dimgrey")
    depth = max(level(s) for s in shapes["encoder"])
    if shapes["encoder"][0] != shapes["input"]:  # smp's encoders list the input itself as their first map
        ax.text(0.0, 0.75, f"input {shapes['input'][0]} × {image_size}", ha="center", fontsize=9)
    ax.set_xlim(-1.3, 4.9)
    ax.set_ylim(-depth - 0.8, 1.1)
    ax.set_axis_off()
    ax.set_title(title, fontsize=11)
    return fig
