"""The region of a study that prediction must look at: a box around the lungs.

COVID-19 lesions (ground glass and consolidation) lie in the lung parenchyma, and a chest CT's
field of view holds much else: chest wall, arms, the table, air. :func:`lung_box` finds one
in-plane box, shared by all slices, around the air inside the body (lungs and airways), widens it
by a margin of context and rounds it to sizes the networks accept. A ResNet34 U-Net does about
62 GFLOP per 512 x 512 slice whatever the slice holds, so predicting on the box instead of the
whole slice saves the same fraction of the arithmetic as of the pixels. It is not exact: the
networks' deepest features see the whole slice, so the context cut off changes predictions inside
the box (``covidseg predict --lungs-box``).

The box is computed on preprocessed slices (HU / 1000), after resizing to the model's size.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .preprocessing import scale_hu

__all__ = ["LUNG_AIR_BELOW_HU", "LUNG_AIR_BELOW", "MARGIN_FRACTION", "lung_box"]

LUNG_AIR_BELOW_HU = -400.0
"""Hounsfield units below which a voxel counts as air or aerated lung. The threshold lies well above
aerated lung (about -850 HU) and air (-1000 HU), and well below fat (about -100 HU) and the other
soft tissues, so that the body wall, fat included, parts the air outside the body from the lungs,
and partial-volume pixels at the lungs' edge still count as lung."""

LUNG_AIR_BELOW = scale_hu(LUNG_AIR_BELOW_HU)
""":data:`LUNG_AIR_BELOW_HU` in the units of the preprocessed slices the box is found on (-0.4)."""

MARGIN_FRACTION = 1 / 16
"""Context kept around the lungs, as a fraction of the slice size (32 px at 512 px)."""


def _span(lo: int, hi: int, size: int, margin: int, multiple: int) -> slice:
    """``[lo, hi)`` widened by ``margin``, then to a multiple of ``multiple`` around its centre,
    kept inside ``[0, size)``; the whole axis when it would not fit."""
    lo, hi = max(0, lo - margin), min(size, hi + margin)
    length = -(-(hi - lo) // multiple) * multiple
    if length >= size:
        return slice(0, size)
    start = min(max(0, lo - (length - (hi - lo)) // 2), size - length)
    return slice(start, start + length)


def lung_box(slices: np.ndarray, margin: int | None = None, multiple: int = 32) -> tuple[slice, slice]:
    """In-plane box around the air enclosed by the body, for a whole study.

    Air is every voxel below :data:`LUNG_AIR_BELOW`; the air connected to the edge of the slices
    (in 3D) is outside the body and dropped. What is left, the lungs, airways and any gas inside
    the body, gives the box. A study without enclosed air gets the whole slice.

    Args:
        slices: ``(Z, H, W)`` preprocessed slices.
        margin: Pixels of context on each side (default: :data:`MARGIN_FRACTION` of the size).
        multiple: Box sides are rounded up to multiples of this (32: every model's five poolings).

    Returns:
        ``(rows, cols)`` slices of the ``(H, W)`` plane.
    """
    _, height, width = slices.shape
    whole = (slice(0, height), slice(0, width))
    if margin is None:
        margin = round(max(height, width) * MARGIN_FRACTION)
    air = slices < LUNG_AIR_BELOW
    labels, _ = ndimage.label(air)
    outside = np.unique(np.concatenate([labels[:, 0, :].ravel(), labels[:, -1, :].ravel(), labels[:, :, 0].ravel(), labels[:, :, -1].ravel()]))
    enclosed = air & ~np.isin(labels, outside)
    if not enclosed.any():
        return whole
    rows = np.flatnonzero(enclosed.any(axis=(0, 2)))
    cols = np.flatnonzero(enclosed.any(axis=(0, 1)))
    return (
        _span(int(rows[0]), int(rows[-1]) + 1, height, margin, multiple),
        _span(int(cols[0]), int(cols[-1]) + 1, width, margin, multiple),
    )
