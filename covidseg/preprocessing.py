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
]

HU_CLIP = (-1000.0, 1000.0)
"""Hounsfield window kept: air (-1000) to dense bone (+1000)."""

HU_SCALE = 1000.0
"""Divisor that maps the clipped window to [-1, 1]."""

AIR_HU = -1000.0
"""Air in Hounsfield units: every chest CT has plenty of it, outside the body and in the lungs."""

_MIN_PLAUSIBLE_LOW_HU = -500.0
"""A chest CT whose 1st percentile lies above this has no air in it: it is not in HU."""

_MIN_PLAUSIBLE_SPREAD_HU = 300.0
"""A chest CT in HU spans at least air to soft tissue; a narrower 1-99% range is suspicious."""


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

    A chest CT in HU contains air (about -1000) and soft tissue (about 0 to +100). A volume
    already scaled to 0..255 or 0..1 would be silently destroyed by clipping, so it is caught here.

    Args:
        volume: The raw intensities.
        path: The file it came from, for the message.
        strict: Raise :class:`~covidseg.errors.DataError` if ``True``, else warn with
            :class:`NotHounsfieldWarning`.

    Raises:
        DataError: If ``strict`` and the range is implausible for HU.
    """
    sample = np.asarray(volume)[::2, ::2, :] if np.ndim(volume) == 3 else np.asarray(volume)
    low, high = np.percentile(sample, [1, 99])
    if low <= _MIN_PLAUSIBLE_LOW_HU and high - low >= _MIN_PLAUSIBLE_SPREAD_HU:
        return
    problem = (
        f"intensities span {low:.4g}..{high:.4g} (1st-99th percentile), which is not Hounsfield units "
        f"(a chest CT has air near {AIR_HU:.0f}); convert it to HU first"
    )
    if strict:
        raise DataError(path, problem)
    warnings.warn(f"{path}: {problem}" if path else problem, NotHounsfieldWarning, stacklevel=2)


def check_binary_mask(mask: np.ndarray, path=None) -> np.ndarray:
    """Return ``mask`` as uint8 after checking that it holds only 0 and 1.

    Raises:
        DataError: If other values occur (e.g. 255, or several labels).
    """
    values = np.unique(mask)
    extra = values[(values != 0) & (values != 1)]
    if extra.size:
        shown = ", ".join(f"{v:g}" for v in extra[:5]) + (", ..." if extra.size > 5 else "")
        raise DataError(path, f"mask values must be 0 or 1, found {shown}")
    return mask.astype(np.uint8, copy=False)
