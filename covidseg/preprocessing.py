"""Hounsfield-unit preprocessing, exactly as the thesis does it (ch. 3.2), and its inverse.

CT voxels are clipped to :data:`HU_CLIP` and divided by :data:`HU_SCALE`, giving float32 values
in [-1, 1] (:func:`preprocess_hu`). The whole way from a study to what a model sees, and back, is
written once, here, for training (:func:`covidseg.dataset.load_study_slices`) and prediction
(:func:`covidseg.prediction.predict_study`) alike:

- :func:`hu_to_slices`: an ``(X, Y, Z)`` volume in HU to float32 ``(Z, H, W)`` model-input slices
  (preprocessed, then resized in-plane, anti-aliased when shrinking);
- :func:`mask_to_slices`: a binary ``(X, Y, Z)`` mask to uint8 ``(Z, H, W)`` slices, resized the
  mask way (area-weighted, then thresholded at 0.5);
- :func:`slices_to_volume`: ``(Z, H, W)`` probabilities back to the study's ``(X, Y, Z)`` grid.

A threshold written in HU is brought to the units of preprocessed slices by :func:`scale_hu`.
The functions are pure: they take an array and return a new one (or the input, where there is
nothing to change).
"""

from __future__ import annotations

import warnings

import numpy as np

from .errors import DataError

__all__ = [
    "HU_CLIP",
    "HU_SCALE",
    "AIR_HU",
    "preprocess_hu",
    "scale_hu",
    "to_slices",
    "from_slices",
    "resize_slices",
    "hu_to_slices",
    "mask_to_slices",
    "slices_to_volume",
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


def scale_hu(hu: float) -> float:
    """A value in Hounsfield units in the units of preprocessed slices: ``hu / HU_SCALE``.

    For thresholds written in HU and applied to preprocessed slices
    (:data:`covidseg.lung_box.LUNG_AIR_BELOW`); no clipping (:func:`preprocess_hu` clips volumes).
    """
    return hu / HU_SCALE


def to_slices(array: np.ndarray) -> np.ndarray:
    """``(X, Y, Z)`` volume to a contiguous ``(Z, X, Y)`` stack of axial slices."""
    return np.ascontiguousarray(np.moveaxis(array, 2, 0))


def from_slices(stack: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_slices`: ``(Z, X, Y)`` back to ``(X, Y, Z)`` (a view)."""
    return np.moveaxis(stack, 0, 2)


def resize_slices(stack: np.ndarray, size: int | tuple[int, int], mode: str) -> np.ndarray:
    """Resize every slice of a ``(Z, H, W)`` stack in-plane.

    Args:
        stack: The slices.
        size: Target ``(H, W)``, or one int for a square.
        mode: ``'bilinear'`` for images and probabilities (anti-aliased when shrinking) or
            ``'mask'`` for binary masks (area-weighted, then thresholded at 0.5).

    Returns:
        float32 for ``'bilinear'``, uint8 for ``'mask'``; ``stack`` itself (a mask as uint8) where
        it already has the size.
    """
    size = (size, size) if isinstance(size, int) else tuple(size)
    if stack.shape[1:] == size:
        return stack if mode != "mask" else stack.astype(np.uint8, copy=False)
    import torch  # heavy: only resizing needs it
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32))[:, None]
    shrink = size[0] < stack.shape[1]
    if mode == "mask":
        out = F.interpolate(tensor, size=size, mode="area" if shrink else "bilinear", align_corners=None if shrink else False)
        return (out[:, 0].numpy() >= 0.5).astype(np.uint8)
    out = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False, antialias=shrink)
    return out[:, 0].numpy()


def hu_to_slices(hu_volume: np.ndarray, image_size: int | None = None) -> np.ndarray:
    """A CT volume as the model's input: preprocessed (:func:`preprocess_hu`), sliced axially and
    resized in-plane to ``image_size`` (bilinear, anti-aliased when shrinking).

    Args:
        hu_volume: ``(X, Y, Z)`` intensities in HU, in the working orientation
            (:func:`covidseg.nifti.load_volume`); check them with :func:`check_hu_range` first.
        image_size: The model's in-plane size; ``None`` keeps the native size.

    Returns:
        float32 ``(Z, H, W)`` slices in [-1, 1], C-contiguous; slice ``k`` is ``hu_volume[:, :, k]``.
    """
    slices = to_slices(preprocess_hu(hu_volume))
    return slices if image_size is None else resize_slices(slices, image_size, "bilinear")


def mask_to_slices(mask: np.ndarray, image_size: int | None = None) -> np.ndarray:
    """A binary mask on a study's grid as training targets for :func:`hu_to_slices`' slices:
    sliced axially and resized in-plane the mask way (area-weighted when shrinking, then
    thresholded at 0.5).

    Args:
        mask: ``(X, Y, Z)`` in {0, 1} (:func:`check_binary_mask` checks it).
        image_size: The model's in-plane size; ``None`` keeps the native size.

    Returns:
        uint8 ``(Z, H, W)`` in {0, 1}.
    """
    slices = to_slices(mask)
    return resize_slices(slices, slices.shape[1:] if image_size is None else image_size, "mask")


def slices_to_volume(probabilities: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Inverse of :func:`hu_to_slices` for a model's output: ``(Z, H, W)`` probabilities resized
    in-plane (bilinear) back to the study's grid.

    Args:
        probabilities: float32 ``(Z, H, W)``.
        shape: The study's ``(X, Y, Z)`` shape.

    Returns:
        float32 ``(X, Y, Z)`` (a view of the resized stack).

    Raises:
        ValueError: If the stack does not have the study's ``Z`` slices.
    """
    if probabilities.shape[0] != shape[2]:
        raise ValueError(f"{probabilities.shape[0]} slices do not fit a study of shape {tuple(shape)}")
    return from_slices(resize_slices(probabilities, tuple(shape[:2]), "bilinear"))


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
