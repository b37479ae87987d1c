"""Small geometric and random-field helpers shared by the phantom's anatomy, vessels and lesions."""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy import ndimage


def _smoothstep(x):
    if isinstance(x, float):
        x = min(max(x, 0.0), 1.0)
        return x * x * (3.0 - 2.0 * x)
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _clip01(x):
    """``x`` clipped to [0, 1] (fast for Python scalars)."""
    return min(max(x, 0.0), 1.0) if isinstance(x, float) else np.clip(x, 0.0, 1.0)


def _band(h, lo, hi, soft=0.03):
    """1 inside ``[lo, hi]`` along the lung-height axis, fading over ``soft`` at both ends."""
    return _smoothstep((h - lo) / soft + 0.5) * _smoothstep((hi - h) / soft + 0.5)


def _profile(h, lo, hi):
    """An ellipsoid's cross-section profile: 0 outside ``[lo, hi]``, 1 at the middle."""
    t = (2.0 * h - (lo + hi)) / (hi - lo)
    if isinstance(t, float):
        return math.sqrt(max(1.0 - t * t, 0.0))
    return np.sqrt(np.clip(1.0 - t * t, 0.0, 1.0))


def _ellipse(X, Y, cx, cy, a, b, angle=0.0):
    """Squared normalised radius of a (rotated) ellipse; the inside is where it is below 1."""
    dx, dy = X - cx, Y - cy
    if angle:
        c, s = np.cos(angle), np.sin(angle)
        dx, dy = c * dx + s * dy, -s * dx + c * dy
    return (dx / np.maximum(a, 1e-3)) ** 2 + (dy / np.maximum(b, 1e-3)) ** 2


def _capsule(X, Y, x0, y0, x1, y1, r):
    """Squared distance to the segment (x0, y0)-(x1, y1), over ``r**2``."""
    ex, ey = x1 - x0, y1 - y0
    t = np.clip(((X - x0) * ex + (Y - y0) * ey) / (ex * ex + ey * ey), 0.0, 1.0)
    return ((X - x0 - t * ex) ** 2 + (Y - y0 - t * ey) ** 2) / np.maximum(r, 1e-3) ** 2


def _smooth_noise(rng, shape, sigma):
    """Smooth zero-mean, unit-std random field on a coarse grid."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-12)


@functools.lru_cache(maxsize=16)
def _interpolation_weights(n_low: int, size: int):
    """Linear interpolation from ``n_low`` to ``size`` samples over the same extent (pixel edges
    aligned, ends clamped): the left and right neighbours and the right one's weight."""
    centres = (np.arange(size) + 0.5) * n_low / size - 0.5
    left = np.clip(np.floor(centres).astype(int), 0, n_low - 1)
    right = np.minimum(left + 1, n_low - 1)
    frac = np.clip(centres - left, 0.0, 1.0).astype(np.float32)
    return left, right, frac


def _upsample(field2d, size):
    """Bilinear upsampling of a square coarse 2D field to ``size`` x ``size`` (float32)."""
    left, right, frac = _interpolation_weights(field2d.shape[0], size)
    f = field2d.astype(np.float32)
    rows = f[left] + frac[:, None] * (f[right] - f[left])
    return rows[:, left] + frac[None, :] * (rows[:, right] - rows[:, left])


def _window(xs, ys, box):
    """Index slices of the pixels whose centres lie in ``box`` = (xmin, xmax, ymin, ymax);
    ``xs`` and ``ys`` are evenly spaced and ascending."""

    def span(axis, lo, hi):
        step = float(axis[1] - axis[0])
        first = max(math.ceil((lo - float(axis[0])) / step), 0)
        last = min(math.floor((hi - float(axis[0])) / step) + 1, len(axis))
        return slice(first, max(first, last))

    return span(xs, box[0], box[1]), span(ys, box[2], box[3])
