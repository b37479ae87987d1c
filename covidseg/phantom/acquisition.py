"""What the scanner adds: correlated noise and the reconstruction circle with its padding value."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .constants import NOISE_GRAIN_MM, NOISE_NEGATIVE_LOBE, PADDING_CHANCE, PADDING_VALUES


def draw_padding(rng) -> int | None:
    """The value stored outside the reconstruction circle (one of :data:`PADDING_VALUES`), or
    ``None`` for a study without padding (air is reconstructed up to the image's corners)."""
    u = float(rng.random())
    if u >= PADDING_CHANCE:
        return None
    return PADDING_VALUES[int(u >= PADDING_CHANCE / 2)]


def outside_circle(size: int) -> np.ndarray:
    """Pixels outside the reconstruction circle inscribed in the ``size`` x ``size`` image, shape
    ``(size, size, 1)``: the scanner reconstructs a disc as wide as the field of view."""
    r = np.arange(size) - (size - 1) / 2.0
    return ((r[:, None] ** 2 + r[None, :] ** 2) > (size / 2.0) ** 2)[:, :, None]


def correlated_noise(rng, shape: tuple[int, int, int], std: float, dx: float) -> np.ndarray:
    """Zero-mean noise of per-voxel standard deviation ``std`` (HU), correlated in the axial plane.

    Filtered back-projection gives noise a grain: white noise blurred over
    :data:`NOISE_GRAIN_MM` minus a share :data:`NOISE_NEGATIVE_LOBE` of a three times broader
    blur (the ramp filter's band-pass). Slices are independent (8 mm apart). At pixels much larger
    than the grain (small ``size``) the noise is nearly white.

    Args:
        rng: A numpy Generator.
        shape: ``(X, Y, Z)``.
        std: Standard deviation in HU.
        dx: In-plane pixel size in mm.

    Returns:
        float32 array of ``shape``.
    """
    white = rng.standard_normal(shape, dtype=np.float32)
    sigma = NOISE_GRAIN_MM / dx
    grain = ndimage.gaussian_filter(white, (sigma, sigma, 0.0), mode="wrap", truncate=3.0)
    grain -= NOISE_NEGATIVE_LOBE * ndimage.gaussian_filter(white, (3.0 * sigma, 3.0 * sigma, 0.0), mode="wrap", truncate=3.0)
    grain *= np.float32(std / (grain.std() + 1e-12))
    return grain
