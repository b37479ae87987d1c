"""Hounsfield-unit preprocessing, exactly as the thesis does it (ch. 3.2).

CT voxels are clipped to :data:`HU_CLIP` and divided by :data:`HU_SCALE`, giving float32 values
in [-1, 1]. The functions are pure: they take an array and return a new one.
"""

from __future__ import annotations

import warnings

import numpy as np

from .errors import DataError

__all__ = [
    "HU_CLIP",
    "HU_SCALE",
    "preprocess_hu",
    "check_hu_range",
    "check_binary_mask",
    "NotHounsfieldWarning",
    "non_binary_values",
    "show_values",
]

HU_CLIP = (-1000.0, 1000.0)
"""Hounsfield window kept: air (-1000) to dense bone (+1000)."""

HU_SCALE = 1000.0
"""Divisor that maps the clipped window to [-1, 1]."""

AIR_HU = -1000.0
"""Air in Hounsfield units: every chest CT has plenty of it, outside the body and in the lungs."""

PADDING_BELOW_HU = -1100.0
"""Values below this are not tissue. The most common of them is taken as padding: the constant
scanners write outside the reconstruction circle (DICOM Pixel Padding Value, e.g. -3024, -2048,
-2000). Padding is not part of the field of view and is left out of :func:`check_hu_range`'s
statistics."""

AIR_PEAK_HU = (-1100.0, -700.0)
"""Where the air peak of a chest CT in HU lies: free air at -1000 (outside the body, trachea)
or, in a volume cropped to the body, aerated lung at about -900 to -750."""

SOFT_TISSUE_HU = (-200.0, 200.0)
"""Soft tissue, blood, muscle and most fat: water is 0 HU by definition."""

_AIR_BELOW_HU = -500.0
"""Voxels at or below this count as air (or aerated lung) when the air peak is located."""

_MIN_FRACTION = 0.01
"""Share of the field of view that air, and soft tissue, must each at least cover."""

_PEAK_BIN_HU = 20.0
"""Width of the histogram bins in which the air peak is located."""

MASK_VALUE_TOLERANCE = 1e-6
"""A mask value within this of 0 or 1 counts as 0 or 1: float32 scaling gives such values (uint8 255
times an ``scl_slope`` of 1/255 reads as 1.0000001), a label or a probability does not."""


class NotHounsfieldWarning(UserWarning):
    """The intensities do not look like Hounsfield units."""


def preprocess_hu(volume: np.ndarray) -> np.ndarray:
    """Clip to :data:`HU_CLIP` and divide by :data:`HU_SCALE`.

    Args:
        volume: CT intensities in Hounsfield units, any shape and numeric dtype.

    Returns:
        A new float32 array of the same shape, with values in [-1, 1].
    """
    out = np.clip(np.asarray(volume, dtype=np.float32), *HU_CLIP)
    out /= np.float32(HU_SCALE)
    return out


def check_hu_range(volume: np.ndarray, path=None, strict: bool = True) -> None:
    """Refuse (or warn about) a volume whose values are plainly not Hounsfield units.

    The Hounsfield scale puts water at 0 and air at -1000 by definition (Hounsfield, Br J Radiol
    46:1016, 1973), and every chest CT holds both air and soft tissue. The rule, on the field of
    view (the volume less padding: the voxels holding the most common value below
    :data:`PADDING_BELOW_HU`, DICOM PS3.3 C.7.5.1.1.2 Pixel Padding Value):

    1. at least 1% of it is air, at or below -500 HU;
    2. the air peak (the most populated 20 HU bin at or below -500 HU) lies within
       :data:`AIR_PEAK_HU`;
    3. at least 1% of it is soft tissue, within :data:`SOFT_TISSUE_HU`.

    This refuses volumes scaled to 0..255 or 0..1 or already preprocessed (no air), stored
    unsigned as HU + 1024 (no air: it sits at +24), shifted down by 1024 (air at -2048, no soft
    tissue), or otherwise rescaled (air away from -1000), all of which clipping would silently
    destroy; padding of -3024 or -2048 outside the reconstruction circle is accepted, and
    :func:`preprocess_hu` clips it to -1000 like air.

    Args:
        volume: The raw intensities, any shape.
        path: The file it came from, for the message.
        strict: Raise :class:`~covidseg.errors.DataError` if ``True``, else warn with
            :class:`NotHounsfieldWarning`.

    Raises:
        DataError: If ``strict`` and the volume breaks the rule; the message gives the 1st-99th
            percentile of the field of view and which part of the rule fails.
    """
    sample = np.asarray(volume)[::2, ::2, :] if np.ndim(volume) == 3 else np.asarray(volume)
    sample = sample.ravel().astype(np.float64, copy=False)
    below = sample[sample < PADDING_BELOW_HU]
    if below.size:  # padding: the most common value below air
        values, counts = np.unique(below, return_counts=True)
        sample = sample[sample != values[np.argmax(counts)]]
    if not sample.size:
        return _refuse(path, "it is empty", strict)
    low, high = np.percentile(sample, [1, 99])
    span = f"intensities span {_show(round(low, 1))}..{_show(round(high, 1))} (1st-99th percentile of the field of view)"
    air = sample[sample <= _AIR_BELOW_HU]
    soft = np.count_nonzero((sample >= SOFT_TISSUE_HU[0]) & (sample <= SOFT_TISSUE_HU[1]))
    problem = None
    if air.size < _MIN_FRACTION * sample.size:
        problem = f"no air (a chest CT has air near {AIR_HU:.0f})"
    else:
        peak = _air_peak(air)
        if not AIR_PEAK_HU[0] <= peak <= AIR_PEAK_HU[1]:
            problem = f"its air peaks at {_show(peak)}, not near {AIR_HU:.0f}"
        elif soft < _MIN_FRACTION * sample.size:
            problem = (f"no soft tissue ({_show(100 * soft / sample.size)}% within "
                       f"{SOFT_TISSUE_HU[0]:.0f}..{SOFT_TISSUE_HU[1]:.0f}, water is 0)")
    if problem is not None:
        _refuse(path, f"{span}, which is not Hounsfield units: {problem}; convert it to HU first", strict)


def _air_peak(air: np.ndarray) -> float:
    """Centre of the most populated :data:`_PEAK_BIN_HU` bin of the air voxels."""
    edges = np.arange(air.min(), air.max() + _PEAK_BIN_HU, _PEAK_BIN_HU)
    counts, edges = np.histogram(air, bins=edges if edges.size > 1 else 1)
    k = int(np.argmax(counts))
    return float((edges[k] + edges[k + 1]) / 2)


def _refuse(path, problem: str, strict: bool) -> None:
    if strict:
        raise DataError(path, problem)
    warnings.warn(f"{path}: {problem}" if path else problem, NotHounsfieldWarning, stacklevel=3)


def non_binary_values(mask: np.ndarray) -> np.ndarray:
    """The distinct values of ``mask`` that are neither 0 nor 1 within :data:`MASK_VALUE_TOLERANCE`,
    sorted (empty for a binary mask)."""
    mask = np.asarray(mask)
    if mask.dtype == bool or ((mask == 0) | (mask == 1)).all():  # the common case, without sorting
        return mask.ravel()[:0]
    values = np.unique(mask)
    if values.dtype.kind == "f":
        near = np.isclose(values, 0, rtol=0, atol=MASK_VALUE_TOLERANCE) | np.isclose(values, 1, rtol=0, atol=MASK_VALUE_TOLERANCE)
    else:
        near = (values == 0) | (values == 1)
    return values[~near]


def show_values(values, limit: int = 5) -> str:
    """``values`` for a message, each as the shortest text that reads back as that exact value
    (``1.0000001``, not ``1``), at most ``limit`` of them."""
    values = np.asarray(values).ravel()
    shown = ", ".join(_show(v) for v in values[:limit])
    return shown + (f", ... ({values.size} values)" if values.size > limit else "")


def _show(value) -> str:
    value = np.asarray(value)[()]
    if isinstance(value, (np.floating, float)):
        if np.isfinite(value) and value == np.round(value):
            return str(int(value))
        return np.format_float_positional(value, unique=True, trim="-")
    return str(value)


def check_binary_mask(mask: np.ndarray, path=None) -> np.ndarray:
    """Return ``mask`` as uint8 after checking that it holds only 0 and 1.

    Values within :data:`MASK_VALUE_TOLERANCE` of 0 or 1 count as 0 or 1 (float32 rounding of
    a scaled mask, e.g. uint8 255 with ``scl_slope`` 1/255); they are rounded.

    Returns:
        The mask as uint8, same shape.

    Raises:
        DataError: If other values occur (e.g. 255, several labels, a probability map); the
            message lists them exactly (``found 1.000002``).
    """
    extra = non_binary_values(mask)
    if extra.size:
        raise DataError(path, f"mask values must be 0 or 1, found {show_values(extra)}")
    if np.asarray(mask).dtype.kind == "f":
        return np.rint(mask).astype(np.uint8)
    return mask.astype(np.uint8, copy=False)
