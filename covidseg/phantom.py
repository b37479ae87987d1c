"""The embedded synthetic chest-CT dataset ("phantom"), written in MosMedData's exact layout.

The real CT volumes of MosMedData COVID19_1110 (Morozov et al., 2020, arXiv:2005.06465) cannot be
redistributed and are large, so CI, the book and the command line default to this phantom. It is
**synthetic, not patient data**: every folder it writes carries a :data:`PHANTOM_MARKER` file
saying so, and every NIfTI header says so in its ``descrip`` field. It is written in the
dataset's own layout (``studies/CT-k/study_NNNN.nii.gz``, ``masks/study_NNNN_mask.nii.gz``,
``dataset_registry.csv``), so all code reads it exactly as it reads the real data.

What is in it:

- the 50 annotated CT-1 studies 0255..0304, with masks, each with the real study's number of
  axial slices (2049 in all, so the thesis split keeps its 1428/212/409 slices, Table 3.1), and
  a lesion burden drawn from the real study's own mask: about the same share of voxels
  (mean 0.19%) on about the same number of slices (38% on average);
- two unannotated studies (no mask) of each other category, with ids in the real ranges and
  lesions over 0% (CT-0), 25-50% (CT-2), 50-75% (CT-3) and over 75% (CT-4) of the lungs.

Each study is a simple but plausible chest in Hounsfield units, slice by slice along z: air,
skin, subcutaneous fat and muscle, ribs sloping around the thorax, sternum, scapulae, a vertebra
with its disc rhythm, mediastinal fat, heart, aorta, the great vessels, trachea and main
bronchi, two lungs (about -850 HU) with a tree of pulmonary vessels that thins towards the
pleura, and the liver dome and stomach under the diaphragm in the lowest slices. Lesions are
hazy ground-glass patches (about -700..-300 HU) with soft edges, some with a consolidated core
(about -100..+50 HU), mostly subpleural and posterior, always inside the lungs; the mask is
ground glass and consolidation together. Partial volume over the 8 mm slab makes thin vessels
faint and thick ones as dense as consolidation, so a model must tell lesions from vessels by
their shape, as on real scans.

Geometry: the volumes are ``int16``, stored in LAS like the real files (affine
``diag(-dx, dx, 8)`` plus an offset, qform and sform code 1). ``dx`` is drawn per study in
0.6..0.9 mm *at 512 pixels*. A smaller ``size`` keeps the chest's physical field of view, so its
pixels are larger (``dx * 512 / size``): the headers stay truthful, and every anatomical size and
lesion statistic holds at any ``size``.

Determinism: study ``k`` of seed ``s`` comes from ``np.random.default_rng([s, k])`` alone, so a
subset of studies is the same as in the full dataset, and the same seed gives byte-identical
files (nibabel writes gzip without a time stamp or file name).
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from . import __version__
from .errors import DataError
from .mosmed import ANNOTATED_IDS, CATEGORIES, Study, mask_path, study_path, write_registry
from .nifti import write_image_atomically
from .splits import mask_facts

__all__ = [
    "PHANTOM_MARKER",
    "PHANTOM_VERSION",
    "PHANTOM_DESCRIPTION",
    "UNANNOTATED_IDS",
    "INVOLVEMENT",
    "LABEL_NAMES",
    "AIR",
    "FAT",
    "SOFT_TISSUE",
    "BONE",
    "LUNG",
    "AIRWAY",
    "LUNG_VESSEL",
    "GROUND_GLASS",
    "CONSOLIDATION",
    "HEART",
    "LUNG_LABELS",
    "LESION_LABELS",
    "generate_study",
    "phantom_studies",
    "write_phantom",
    "is_phantom",
    "default_phantom_dir",
    "ensure_phantom",
]

PHANTOM_MARKER = "SYNTHETIC_PHANTOM.txt"
"""File at the root of every phantom folder saying that the data is synthetic."""

PHANTOM_VERSION = 1
"""Version of the generator's output; part of the cache folder's name, bumped on any change."""

PHANTOM_DESCRIPTION = "covidseg synthetic phantom - not patient data"
"""Text of every phantom NIfTI header's ``descrip`` field."""

UNANNOTATED_IDS = {"CT-0": (12, 201), "CT-2": (947, 1021), "CT-3": (1071, 1098), "CT-4": (1109, 1110)}
"""Ids of the unannotated studies, two per category, within each category's real id range
(CT-0: 1..254, CT-2: 939..1063, CT-3: 1064..1108, CT-4: 1109..1110)."""

INVOLVEMENT = {"CT-0": (0.0, 0.0), "CT-2": (0.25, 0.50), "CT-3": (0.50, 0.75), "CT-4": (0.75, 0.92)}
"""Share of the lungs covered by lesion in the unannotated categories (CT-1 follows the real masks)."""

LABEL_NAMES = (
    "air",
    "fat",
    "soft_tissue",
    "bone",
    "lung",
    "airway",
    "lung_vessel",
    "ground_glass",
    "consolidation",
    "heart",
)
"""Classes of the label map returned by ``generate_study(..., return_labels=True)``; a voxel's
label is its index in this tuple."""

AIR, FAT, SOFT_TISSUE, BONE, LUNG, AIRWAY, LUNG_VESSEL, GROUND_GLASS, CONSOLIDATION, HEART = range(len(LABEL_NAMES))
LUNG_LABELS = (LUNG, LUNG_VESSEL, GROUND_GLASS, CONSOLIDATION)
"""Labels of the lung parenchyma (with its vessels and lesions)."""
LESION_LABELS = (GROUND_GLASS, CONSOLIDATION)
"""Labels of the mask: ground-glass opacification and consolidation."""

# --- Acquisition -----------------------------------------------------------------------------
SLICE_SPACING_MM = 8.0
PIXEL_SPACING_512_MM = (0.6, 0.9)  # in-plane spacing at 512 px, drawn per study
SLICES_RANGE = (33, 53)  # axial slices of an unannotated study (the real CT-1 range)
NOISE_STD_HU = (15.0, 25.0)
HU_RANGE = (-1024, 3071)
MIN_SIZE = 32  # smallest in-plane size in pixels

# --- Tissue densities (HU) ---------------------------------------------------------------------
AIR_HU = -1000.0
FAT_HU = -100.0
MEDIASTINAL_FAT_HU = -85.0
SKIN_HU = 30.0
MUSCLE_HU = 45.0
BLOOD_HU = 40.0
HEART_HU = 42.0
LIVER_HU = 58.0
SPLEEN_HU = 48.0
STOMACH_HU = 28.0
CSF_HU = 15.0
CARTILAGE_HU = 120.0
DISC_HU = 85.0
CANCELLOUS_BONE_HU = (200.0, 280.0)
CORTICAL_BONE_HU = 850.0
LUNG_HU = (-885.0, -855.0)
GROUND_GLASS_HU = (-640.0, -420.0)
CONSOLIDATION_HU = (-70.0, 30.0)

# --- Anatomy ----------------------------------------------------------------------------------
STANDARD_HALF_WIDTH_MM = 160.0  # body half-width of the standard patient; anatomy scales with it
LUNG_HEIGHT_MM = (235.0, 285.0)
VESSEL_STEP_PIXELS = 0.5  # sampling step along a vessel segment
VESSEL_MIN_RADIUS_MM = 0.45
TREE_MAX_GENERATIONS = 40
TREE_TRUNKS = 9  # per root
TREE_ROOTS = (  # (lung height from the carina, Y from the trachea (mm), radius scale, upward bias)
    (-0.08, -10.0, 1.0, 0.3),  # pulmonary arteries at the hilum
    (-0.24, -16.0, 0.9, -0.4),  # pulmonary veins, towards the left atrium
)
VESSEL_GAIN = 1.6  # partial-volume boost, so that thick vessels reach blood density
PLANNING_PIXELS = 96  # grid on which vessels grow and lesions are placed, independent of ``size``
LUNG_MAP_STEP_MM = SLICE_SPACING_MM  # vessels are drawn on the nearest slice, and clipped to its lungs
LESION_EDGE_IRREGULARITY = (0.22, 0.12)  # log-amplitude of coarse and fine edge modulation
LESION_SATELLITES = (2, 9)  # range of small patches around each lesion
BODY_SHAPE_EXPONENT = 2.4  # superellipse of the body outline
RIB_HALF_HEIGHT_MM = 4.5
AIRWAY_WALL = 1.45  # squared normalised radius of an airway wall's outer edge


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


@dataclass(frozen=True)
class _Shape:
    """A mediastinal or spinal structure of one axial level.

    ``params`` are an ellipse's ``(cx, cy, a, b, angle)`` or a capsule's ``(x0, y0, x1, y1, r)``
    in body-centred mm; ``active`` says whether it is present at that level.
    """

    kind: str
    params: tuple
    active: object
    hu: float
    label: int
    keep_out: float = 1.0  # the lung stays where the squared normalised distance >= keep_out
    texture: float = 0.0  # HU amplitude of the smooth texture
    above_diaphragm: bool = False

    def dist(self, X, Y):
        """Squared normalised distance to the structure (inside where below 1)."""
        if self.kind == "ellipse":
            return _ellipse(X, Y, *self.params)
        return _capsule(X, Y, *self.params)

    def box(self, level):
        """``(xmin, xmax, ymin, ymax)`` enclosing ``dist < level`` (scalar parameters)."""
        s = np.sqrt(level)
        if self.kind == "ellipse":
            cx, cy, a, b, _ = self.params
            r = max(a, b) * s
            return cx - r, cx + r, cy - r, cy + r
        x0, y0, x1, y1, r = self.params
        return min(x0, x1) - r * s, max(x0, x1) + r * s, min(y0, y1) - r * s, max(y0, y1) + r * s


@dataclass
class _Patient:
    """Body geometry of one synthetic study, in mm.

    Coordinates: ``X`` runs to the patient's left, ``Y`` anteriorly, both from the body's centre;
    ``z`` runs superiorly from the centre of slice 0. ``h`` is the height in the lungs, 0 at the
    lowest costophrenic recess and 1 at the apex. Sizes are those of a standard patient (body
    half-width :data:`STANDARD_HALF_WIDTH_MM`) times ``k``.
    """

    n_slices: int
    dx512: float
    k: float
    width: float
    depth_ant: float
    depth_post: float
    fat: float
    cx: float
    cy: float
    z_base: float
    lung_height: float
    dome_right: float
    dome_left: float
    carina: float
    heart: tuple
    lung_hu: float
    lung_gradient: float
    cancellous_hu: float
    disc_phase: float
    rib_phase: float
    noise_std: float
    origin: tuple

    @property
    def a_c(self):  # pleural cavity half-width
        return self.width - self.fat - 24.0 * self.k

    @property
    def b_ant(self):
        return self.depth_ant - self.fat - 24.0 * self.k

    @property
    def b_post(self):
        return self.depth_post - self.fat - 28.0 * self.k

    @property
    def y_vb(self):  # vertebral body centre
        return -self.b_post + 30.0 * self.k

    def h_of_z(self, z):
        return (np.asarray(z, dtype=float) - self.z_base) / self.lung_height

    def trachea_y(self, h):
        return self.y_vb + 42.0 * self.k + 16.0 * self.k * _clip01((h - 0.95) / 0.3)

    # regions, broadcasting over X and Y ------------------------------------------------------
    def cavity(self, X, Y):
        """Squared normalised radius of the pleural cavity (an ellipse with a longer front half)."""
        b = np.where(Y > 0, self.b_ant, self.b_post)
        return (X / self.a_c) ** 2 + (Y / b) ** 2

    def diaphragm(self, X, Y):
        """Lung height of the diaphragm at each point (the abdomen lies below it)."""
        a = self.a_c
        by = 0.5 * (self.b_ant + self.b_post)
        ry = ((Y - 0.1 * self.b_ant) / by) ** 2 + 0.12 * np.clip(-Y / self.b_post, 0.0, 1.0) / 0.33
        right = -0.33 * ((X + 0.42 * a) / (0.6 * a)) ** 2 + self.dome_right
        left = -0.33 * ((X - 0.42 * a) / (0.6 * a)) ** 2 + self.dome_left
        return np.maximum(right, left) - 0.33 * ry

    def apex(self, X, Y, h):
        """Each lung narrows to a posterolateral dome towards h = 1."""
        limit = 1.25 * np.sqrt(_clip01(1.0 - ((np.maximum(h, 0.5) - 0.5) / 0.5) ** 2))
        by = 0.5 * (self.b_ant + self.b_post)
        r = ((np.abs(X) - 0.45 * self.a_c) / (0.62 * self.a_c)) ** 2 + ((Y + 0.1 * by) / (1.15 * by)) ** 2
        return r < limit * limit

    def mediastinum_band(self, X, Y, h):
        """The mediastinum between the lungs: a thin anterior junction, wider behind the heart."""
        k = self.k
        width = 3.0 * k + 13.0 * k * np.clip((0.55 * self.b_ant - Y) / (0.55 * self.b_ant), 0.0, 1.0)
        width = width + 14.0 * k * _clip01((h - 0.85) / 0.15)
        return (np.abs(X - 2.0 * k) < width) & (Y > self.y_vb - 5.0 * k)

    def structures(self, h, z=None):
        """The mediastinal and spinal structures at lung height ``h``, in painting order."""
        k, S = self.k, _Shape
        ytr = self.trachea_y(h)
        xd, yd = 22.0 * k, self.y_vb + 12.0 * k  # descending aorta
        asc = (-10.0 * k, 0.25 * self.b_ant)
        trunk = (14.0 * k, 0.35 * self.b_ant)
        dxh, dyh, scale, angle = self.heart
        prof = scale * _profile(h, -0.01, 0.57)
        hx, hy, ha, hb = 20.0 * k + dxh, 0.2 * self.b_ant + dyh, 56.0 * k * prof, 43.0 * k * prof
        heart_on = prof > 0.05

        def on(lo, hi):
            return lo < h < hi

        def vessel(kind, params, active):
            return S(kind, params, active, BLOOD_HU, SOFT_TISSUE, keep_out=1.15, texture=4.0)

        shapes = [
            S("ellipse", (hx, hy, ha + 5.0 * k, hb + 5.0 * k, angle), heart_on, FAT_HU, FAT, 1.0, 20.0, True),
            S("ellipse", (hx, hy, ha, hb, angle), heart_on, HEART_HU, HEART, 1.0, 5.0, True),
            vessel("ellipse", (*asc, 15.0 * k, 15.0 * k, 0.0), on(0.50, 0.83)),
            vessel("ellipse", (-30.0 * k, 0.18 * self.b_ant, 10.0 * k, 10.0 * k, 0.0), on(0.55, 0.98)),
            vessel("ellipse", (*trunk, 13.0 * k, 13.0 * k, 0.0), on(0.49, 0.62)),
            vessel("capsule", (5.0 * k, 0.3 * self.b_ant, -38.0 * k, ytr - 8.0 * k, 8.5 * k), on(0.55, 0.61)),
            vessel("capsule", (*trunk, 38.0 * k, ytr - 8.0 * k, 8.5 * k), on(0.60, 0.66)),
            vessel("capsule", (*asc, xd, yd, 12.5 * k), on(0.82, 0.88)),
            vessel("ellipse", (xd, yd, 11.0 * k, 11.0 * k, 0.0), h < 0.85),
            vessel("ellipse", (-10.0 * k, ytr + 14.0 * k, 6.5 * k, 6.5 * k, 0.0), on(0.87, 1.3)),
            vessel("ellipse", (7.0 * k, ytr + 11.0 * k, 4.5 * k, 4.5 * k, 0.0), on(0.87, 1.3)),
            vessel("ellipse", (15.0 * k, ytr + 1.0 * k, 5.5 * k, 5.5 * k, 0.0), on(0.87, 1.3)),
            vessel("ellipse", (-26.0 * k, ytr + 20.0 * k, 8.0 * k, 8.0 * k, 0.0), on(0.86, 1.3)),
            vessel("capsule", (28.0 * k, ytr + 22.0 * k, -20.0 * k, ytr + 27.0 * k, 6.0 * k), on(0.86, 0.93)),
            # oesophagus, with a margin of mediastinal fat
            S("ellipse", (2.0 * k, self.y_vb + 24.0 * k, 8.0 * k, 6.0 * k, 0.0), True, MUSCLE_HU, SOFT_TISSUE, 1.9),
        ]
        # spine: paraspinal muscles, posterior elements, canal, vertebral body (disc rhythm)
        yv = self.y_vb
        disc = 0.0 if z is None else self._disc_fraction(z)
        cortex = CORTICAL_BONE_HU + disc * (DISC_HU - CORTICAL_BONE_HU)
        marrow = self.cancellous_hu + disc * (DISC_HU - self.cancellous_hu)
        posterior_bone = 0.5 * (CORTICAL_BONE_HU + self.cancellous_hu)
        shapes += [
            S("ellipse", (-27.0 * k, yv - 26.0 * k, 19.0 * k, 19.0 * k, 0.0), True, MUSCLE_HU, SOFT_TISSUE, 1.0, 8.0),
            S("ellipse", (27.0 * k, yv - 26.0 * k, 19.0 * k, 19.0 * k, 0.0), True, MUSCLE_HU, SOFT_TISSUE, 1.0, 8.0),
            S("ellipse", (-20.0 * k, yv - 20.0 * k, 11.0 * k, 4.0 * k, -0.35), True, posterior_bone, BONE, 0.0),
            S("ellipse", (20.0 * k, yv - 20.0 * k, 11.0 * k, 4.0 * k, 0.35), True, posterior_bone, BONE, 0.0),
            S("ellipse", (0.0, yv - 40.0 * k, 3.5 * k, 10.0 * k, 0.0), True, posterior_bone, BONE, 0.0),
            S("ellipse", (0.0, yv - 22.0 * k, 11.5 * k, 11.5 * k, 0.0), True, posterior_bone, BONE, 0.0),
            S("ellipse", (0.0, yv - 22.0 * k, 7.5 * k, 7.5 * k, 0.0), True, CSF_HU, SOFT_TISSUE, 0.0),
            S("ellipse", (0.0, yv, 16.0 * k, 14.0 * k, 0.0), True, cortex, BONE, 1.4),
            S("ellipse", (0.0, yv, 14.0 * k, 12.0 * k, 0.0), True, marrow, BONE, 0.0),
        ]
        return shapes

    def airways(self, h):
        """Trachea, main and lower-lobe bronchi at lung height ``h`` (lumens; walls around them)."""
        k, S = self.k, _Shape
        ytr = self.trachea_y(h)
        u = _clip01((self.carina - h) / 0.12)
        v = _clip01((self.carina - 0.12 - h) / 0.16)
        main = (h <= self.carina) & (h > self.carina - 0.12)
        lobar = (h <= self.carina - 0.12) & (h > self.carina - 0.28)
        return [
            S("ellipse", (0.0, ytr, 8.5 * k, 8.0 * k, 0.0), h > self.carina, AIR_HU, AIRWAY, 0.0),
            S("ellipse", (-(5.0 + 30.0 * u) * k, ytr - 4.0 * k * u, 6.5 * k, 6.0 * k, 0.0), main, AIR_HU, AIRWAY, 0.0),
            S("ellipse", ((5.0 + 36.0 * u) * k, ytr - 6.0 * k * u, 6.0 * k, 5.5 * k, 0.0), main, AIR_HU, AIRWAY, 0.0),
            S("ellipse", (-(35.0 + 8.0 * v) * k, ytr - (4.0 + 14.0 * v) * k, 4.5 * k, 4.0 * k, 0.0), lobar, AIR_HU, AIRWAY, 0.0),
            S("ellipse", ((41.0 + 8.0 * v) * k, ytr - (6.0 + 14.0 * v) * k, 4.5 * k, 4.0 * k, 0.0), lobar, AIR_HU, AIRWAY, 0.0),
        ]

    # one axial slice ---------------------------------------------------------------------
    def place_structures(self, xs, ys, h, z=None):
        """The structures present at lung height ``h`` (scalar), each with the index window of
        the grid ``xs`` x ``ys`` that holds it and its squared normalised distance there."""
        X, Y = xs[:, None], ys[None, :]
        placed = []
        for s in self.structures(h, z):
            if s.active:
                win = _window(xs, ys, s.box(max(s.keep_out, 1.0)))
                placed.append((s, win, s.dist(X[win[0]], Y[:, win[1]])))
        return placed

    def lung_slice(self, xs, ys, h, placed, cav=None):
        """Where the lungs are on the grid ``xs`` x ``ys`` at lung height ``h``: in the cavity,
        under the apex, above the diaphragm, outside the mediastinum and clear of the structures
        ``placed`` by :meth:`place_structures` (evaluated only in their windows)."""
        X, Y = xs[:, None], ys[None, :]
        cav = self.cavity(X, Y) if cav is None else cav
        lung = (cav < 1.0) & self.apex(X, Y, h) & ~self.mediastinum_band(X, Y, h) & (h <= 1.0)
        if h < max(self.dome_right, self.dome_left):  # the diaphragm is nowhere higher
            lung &= h >= self.diaphragm(X, Y)
        for s, win, d in placed:
            if s.keep_out > 0:
                lung[win] &= d >= s.keep_out
        return lung

    def render_slice(self, xs, ys, z, texture):
        """HU (float32), labels (uint8) and lung (bool) of the axial slice at height ``z`` (mm).

        ``xs`` and ``ys`` are the body-centred coordinates (mm, ascending) of the pixel centres
        along axes 0 and 1; ``texture`` is a smooth unit random field of the slice. Small
        structures are evaluated only inside their bounding boxes.
        """
        k = self.k
        h = float(self.h_of_z(z))
        X, Y = xs[:, None], ys[None, :]
        shape = (len(xs), len(ys))
        hu = np.full(shape, AIR_HU, dtype=np.float32)
        lab = np.zeros(shape, dtype=np.uint8)

        def paint(where, value, label, amp=0.0):
            hu[where] = value + amp * texture[where] if amp else value
            lab[where] = label

        # body wall: skin, subcutaneous fat, muscle (a superellipse, flatter at the back)
        width = self.width * (1.0 - 0.05 * _clip01((h - 0.85) / 0.3))
        d_ant = self.depth_ant * (1.0 + 0.05 * _clip01(-h / 0.4))

        def wall(inset):
            bx = np.abs(xs / (width - inset)) ** BODY_SHAPE_EXPONENT
            by = np.abs(ys / np.where(ys > 0, d_ant - inset, self.depth_post - inset)) ** BODY_SHAPE_EXPONENT
            return bx[:, None] + by[None, :] < 1.0

        paint(wall(0.0), SKIN_HU, SOFT_TISSUE)
        paint(wall(1.8 * k), FAT_HU, FAT, 25.0)
        muscle = wall(self.fat)
        paint(muscle, MUSCLE_HU, SOFT_TISSUE, 8.0)

        # pleural cavity, filled with mediastinal fat by default; ribs, scapulae and sternum
        cav = self.cavity(X, Y)
        inside = cav < 1.0
        paint(inside, MEDIASTINAL_FAT_HU, FAT, 30.0)
        self._paint_ribs(hu, lab, X, Y, z, h, cav, muscle)
        ster = _band(h, 0.08, 1.02, 0.04)
        if ster > 0.05:
            wide = 1.0 + 0.6 * _clip01((h - 0.8) / 0.15)
            d = _ellipse(X, Y, 0.0, self.b_ant + 9.0 * k, 12.0 * k * wide, 5.5 * k)
            paint(d < 1.0, MUSCLE_HU + ster * (CORTICAL_BONE_HU - MUSCLE_HU), BONE)
            paint(d < 0.45, MUSCLE_HU + ster * (self.cancellous_hu - MUSCLE_HU), BONE)

        # abdomen under the diaphragm: liver on the right, stomach and spleen on the left
        abdomen = np.zeros(shape, dtype=bool)
        if h < max(self.dome_right, self.dome_left):
            dia = self.diaphragm(X, Y)
            abdomen = inside & (h < dia)
            liver = abdomen & (X < 0.18 * self.a_c - 0.3 * Y)
            paint(abdomen, STOMACH_HU, SOFT_TISSUE, 6.0)
            paint(liver, LIVER_HU, SOFT_TISSUE, 6.0)
            paint(abdomen & ~liver & (Y < 0.1 * self.b_post), SPLEEN_HU, SOFT_TISSUE, 6.0)
            bubble = _ellipse(X, Y, 0.5 * self.a_c, 0.3 * self.b_ant, 22.0 * k, 16.0 * k) < 1.0
            paint(abdomen & bubble & (dia - h < 0.04), AIR_HU, AIR)

        # lungs (denser posteriorly, where they depend)
        placed = self.place_structures(xs, ys, h, z)
        lung = self.lung_slice(xs, ys, h, placed, cav)
        dependent = np.clip(0.5 - ys / (self.b_ant + self.b_post), 0.0, 1.0)[None, :]
        hu[lung] = (self.lung_hu + self.lung_gradient * dependent + 12.0 * texture)[lung]
        lab[lung] = LUNG

        # mediastinal structures and spine, then the airways
        for s, win, d in placed:
            where = d < 1.0
            if s.above_diaphragm:
                where &= ~abdomen[win]
            hu_w, lab_w = hu[win], lab[win]
            hu_w[where] = s.hu + s.texture * texture[win][where] if s.texture else s.hu
            lab_w[where] = s.label
        for s in (a for a in self.airways(h) if a.active):
            win = _window(xs, ys, s.box(AIRWAY_WALL))
            d = s.dist(X[win[0]], Y[:, win[1]])
            hu_w, lab_w = hu[win], lab[win]
            hu_w[d < AIRWAY_WALL], lab_w[d < AIRWAY_WALL] = SKIN_HU, SOFT_TISSUE
            hu_w[d < 1.0], lab_w[d < 1.0] = AIR_HU, AIRWAY
        return hu, lab, lung & (lab == LUNG)

    def _disc_fraction(self, z):
        """Share of the 8 mm slab taken by an intervertebral disc (6 mm discs every 26 mm)."""
        period, half_disc = 26.0 * self.k, 3.0 * self.k
        d = abs((z - self.disc_phase + period / 2) % period - period / 2)
        return float(np.clip(SLICE_SPACING_MM / 2 + half_disc - d, 0.0, 2 * half_disc) / SLICE_SPACING_MM)

    def _paint_ribs(self, hu, lab, X, Y, z, h, cav, muscle):
        """Twelve ribs sloping down from the spine to the front, each seen where it crosses the
        8 mm slab (partial volume), then costal cartilage; scapulae behind the upper ribs."""
        k = self.k
        r = np.sqrt(X * X + Y * Y) + 1e-6
        d_out = (1.0 - 1.0 / np.sqrt(np.maximum(cav, 1e-12))) * r  # approx. distance outside the cavity, mm
        near = (d_out > 1.0 * k) & (d_out < 21.0 * k) & muscle
        idx = np.nonzero(near)
        if not idx[0].size:
            return
        d = d_out[idx]
        p = np.arccos(np.clip(-np.broadcast_to(Y, r.shape)[idx] / r[idx], -1.0, 1.0)) / np.pi  # 0 back .. 1 front
        t = (d - 1.5 * k) / (8.0 * k)  # depth across the rib, 0..1
        in_rib = (t > 0.0) & (t < 1.0)
        half = RIB_HALF_HEIGHT_MM * k * np.sqrt(np.clip(1.0 - (2.0 * t - 1.0) ** 2, 0.0, 1.0))
        spacing = (self.lung_height + 60.0) / 11.5
        drop = 0.5 * self.lung_height
        best = np.zeros(p.shape)
        cartilage = np.zeros(p.shape, dtype=bool)
        pr, hr = p[in_rib][None, :], half[in_rib][None, :]
        rib = np.arange(12)[:, None]
        z_post = self.z_base + self.lung_height + 10.0 + self.rib_phase - rib * spacing
        z_rib = z_post - drop * np.clip((pr - 0.08) / 0.8, 0.0, 1.0)
        overlap = np.clip(np.minimum(z + 4.0, z_rib + hr) - np.maximum(z - 4.0, z_rib - hr), 0.0, 8.0) / 8.0
        end = np.where(rib < 7, 0.80, 0.80 - 0.06 * (rib - 6))  # the lower ribs are shorter
        best[in_rib] = np.where((pr > 0.07) & (pr < end), overlap, 0.0).max(axis=0, initial=0.0)
        cartilage[in_rib] = ((pr >= end) & (pr < 0.93) & (rib < 7) & (overlap > 0.4)).any(axis=0)
        rib_hu = np.where((t < 0.25) | (t > 0.75), CORTICAL_BONE_HU, self.cancellous_hu)
        values = hu[idx] + best * (rib_hu - hu[idx])
        values = np.where(cartilage, CARTILAGE_HU, values)
        labels = np.where((best > 0.5) | cartilage, BONE, lab[idx])
        scapula = _band(h, 0.5, 1.05, 0.05)
        if scapula > 0.05:
            blade = (d > 15.0 * k) & (d < 19.0 * k) & (p > 0.17) & (p < 0.42)
            values = np.where(blade, MUSCLE_HU + scapula * (0.7 * CORTICAL_BONE_HU - MUSCLE_HU), values)
            labels = np.where(blade & (scapula > 0.5), BONE, labels)
        hu[idx], lab[idx] = values, labels


def _window(xs, ys, box):
    """Index slices of the pixels whose centres lie in ``box`` = (xmin, xmax, ymin, ymax);
    ``xs`` and ``ys`` are evenly spaced and ascending."""

    def span(axis, lo, hi):
        step = float(axis[1] - axis[0])
        first = max(math.ceil((lo - float(axis[0])) / step), 0)
        last = min(math.floor((hi - float(axis[0])) / step) + 1, len(axis))
        return slice(first, max(first, last))

    return span(xs, box[0], box[1]), span(ys, box[2], box[3])


def _draw_patient(rng, n_slices, min_lung_slices):
    """Draw a study's body geometry (always the same draws in the same order)."""
    dx512 = round(float(rng.uniform(*PIXEL_SPACING_512_MM)), 4)
    fill = rng.uniform(0.80, 0.88)
    drawn_slices = int(rng.integers(SLICES_RANGE[0], SLICES_RANGE[1] + 1))
    n = drawn_slices if n_slices is None else int(n_slices)
    width = dx512 * 256.0 * fill
    k = width / STANDARD_HALF_WIDTH_MM
    depth_ant = width * rng.uniform(0.72, 0.80)
    depth_post = width * rng.uniform(0.68, 0.74)
    fat = rng.uniform(6.0, 24.0) * k
    cx = rng.uniform(-8.0, 8.0)
    cy = rng.uniform(-22.0, 6.0)
    span = (n - 1) * SLICE_SPACING_MM
    lung_height = rng.uniform(*LUNG_HEIGHT_MM) * (0.9 + 0.1 * k)
    lung_height = float(np.clip(max(lung_height, (min_lung_slices + 3) * SLICE_SPACING_MM), 0.5 * span, span - 12.0))
    z_base = (span - lung_height) * rng.uniform(0.55, 0.8)
    heart = (rng.uniform(-4, 4) * k, rng.uniform(-4, 4) * k, rng.uniform(0.9, 1.12), rng.uniform(0.45, 0.75))
    return _Patient(
        n_slices=n,
        dx512=dx512,
        k=k,
        width=width,
        depth_ant=depth_ant,
        depth_post=depth_post,
        fat=fat,
        cx=cx,
        cy=cy,
        z_base=z_base,
        lung_height=lung_height,
        dome_right=rng.uniform(0.24, 0.32),
        dome_left=rng.uniform(0.17, 0.23),
        carina=rng.uniform(0.6, 0.66),
        heart=heart,
        lung_hu=rng.uniform(*LUNG_HU),
        lung_gradient=rng.uniform(20.0, 45.0),
        cancellous_hu=rng.uniform(*CANCELLOUS_BONE_HU),
        disc_phase=rng.uniform(0.0, 26.0),
        rib_phase=rng.uniform(-6.0, 6.0),
        noise_std=rng.uniform(*NOISE_STD_HU),
        origin=(rng.uniform(-25.0, 25.0), rng.uniform(-10.0, 10.0), -rng.uniform(900.0, 1300.0)),
    )


# --- Pulmonary vessel tree ---------------------------------------------------------------------
@dataclass(frozen=True)
class _LungMap:
    """The lungs sampled on the planning grid (:data:`PLANNING_PIXELS` over the field of view)
    every :data:`LUNG_MAP_STEP_MM` along z, independently of the output size."""

    xs: np.ndarray  # body-centred mm of the grid's pixel centres along axis 0
    ys: np.ndarray  # and axis 1
    lung: np.ndarray  # (n, n, levels) bool

    @classmethod
    def build(cls, pat: _Patient) -> _LungMap:
        n = PLANNING_PIXELS
        coords = (np.arange(n) - (n - 1) / 2.0) * (pat.dx512 * 512.0 / n)
        xs, ys = coords - pat.cx, coords - pat.cy
        levels = np.arange(0.0, (pat.n_slices - 1) * SLICE_SPACING_MM + 1e-6, LUNG_MAP_STEP_MM)
        lung = [pat.lung_slice(xs, ys, h, pat.place_structures(xs, ys, h)) for h in pat.h_of_z(levels).tolist()]
        return cls(xs, ys, np.stack(lung, axis=2))

    @property
    def step(self) -> float:
        return float(self.xs[1] - self.xs[0])

    def slices(self) -> np.ndarray:
        """The lungs at the slice centres, shape ``(n, n, Z)``."""
        return self.lung[:, :, :: int(round(SLICE_SPACING_MM / LUNG_MAP_STEP_MM))]

    def inside(self, points: np.ndarray) -> np.ndarray:
        """Whether points ``(N, 3)`` (X, Y, z in mm) lie in the lungs (nearest sample)."""
        i = np.rint((points[:, 0] - self.xs[0]) / self.step).astype(int)
        j = np.rint((points[:, 1] - self.ys[0]) / self.step).astype(int)
        level = np.rint(points[:, 2] / LUNG_MAP_STEP_MM).astype(int)
        n, _, n_levels = self.lung.shape
        ok = (i >= 0) & (i < n) & (j >= 0) & (j < n) & (level >= 0) & (level < n_levels)
        out = np.zeros(len(points), dtype=bool)
        out[ok] = self.lung[i[ok], j[ok], level[ok]]
        return out


def _vessel_tree(pat: _Patient, lungs: _LungMap, rng) -> np.ndarray:
    """Grow a branching pulmonary vessel tree in each lung from its hilum.

    Returns:
        The segments, shape ``(N, 8)``: start (X, Y, z in mm), unit direction, length and
        radius (mm).
    """
    k = pat.k
    inside = lungs.inside

    # all roots grow together, one generation at a time
    starts, dirs, radii, origin = [], [], [], []
    for side in (-1.0, 1.0):
        for dh, dy, r_scale, up in TREE_ROOTS:
            h_root = pat.carina + dh
            root = np.array([side * 34.0 * k, pat.trachea_y(h_root) + dy * k, pat.z_base + h_root * pat.lung_height])
            for _ in range(30):  # step laterally until the root lies in the lung
                if inside(root[None])[0]:
                    break
                root[0] += side * 2.0 * k
            # trunks fan out laterally, forwards, backwards, up and down
            lateral = side * rng.uniform(0.15, 1.0, TREE_TRUNKS)
            d = np.column_stack([lateral, rng.normal(0.0, 0.6, TREE_TRUNKS), rng.normal(up, 0.9, TREE_TRUNKS)])
            dirs.append(d / np.linalg.norm(d, axis=1, keepdims=True))
            radii.append(rng.uniform(3.5, 5.0, TREE_TRUNKS) * k * r_scale)
            starts.append(np.repeat(root[None], TREE_TRUNKS, axis=0))
    starts, dirs, radii = np.concatenate(starts), np.concatenate(dirs), np.concatenate(radii)
    origin = starts.copy()
    segments = []
    fractions = np.array([0.5, 1.0])
    for _ in range(TREE_MAX_GENERATIONS):
        lengths = radii * rng.uniform(4.0, 7.0, len(radii)) + 2.0
        # keep the part of each segment that stays inside the lung
        probe = starts[:, None, :] + dirs[:, None, :] * (lengths[:, None] * fractions)[:, :, None]
        ok = inside(probe.reshape(-1, 3)).reshape(len(starts), len(fractions))
        kept = np.cumprod(ok, axis=1).sum(axis=1)
        lengths = np.where(kept > 0, lengths * kept / len(fractions), lengths * 0.15)
        segments.append(np.column_stack([starts, dirs, lengths, radii]))
        parent = (kept == len(fractions)) & (radii * 0.8 >= VESSEL_MIN_RADIUS_MM)
        if not parent.any():
            break
        d, r, o = dirs[parent], radii[parent], origin[parent]
        ends = starts[parent] + d * lengths[parent, None]
        m = len(r)
        # two children: a straighter thick one and a more divergent thin one, both leaning
        # away from their root so that the tree fills the lung
        perp = np.cross(d, rng.standard_normal((m, 3)))
        perp /= np.linalg.norm(perp, axis=1, keepdims=True) + 1e-12
        away = ends - o
        away /= np.linalg.norm(away, axis=1, keepdims=True) + 1e-12
        new_dirs, new_radii = [], []
        for ratio, angle in (((0.8, 0.92), (0.15, 0.45)), ((0.6, 0.8), (-1.1, -0.55))):
            a = rng.uniform(*angle, m)[:, None]
            nd = np.cos(a) * d + np.sin(a) * perp + 0.3 * away
            new_dirs.append(nd / np.linalg.norm(nd, axis=1, keepdims=True))
            new_radii.append(r * rng.uniform(*ratio, m))
        dirs, radii = np.concatenate(new_dirs), np.concatenate(new_radii)
        starts, origin = np.concatenate([ends, ends]), np.concatenate([o, o])
        keep = radii >= VESSEL_MIN_RADIUS_MM
        starts, dirs, radii, origin = starts[keep], dirs[keep], radii[keep], origin[keep]
    return np.concatenate(segments)


def _sample_vessels(seg: np.ndarray, step: float) -> np.ndarray:
    """Points every ``step`` mm along the segments ``(start xyz, direction xyz, length, radius)``.

    Returns:
        Shape ``(N, 5)``: X, Y, z (mm), radius (mm) and the step.
    """
    counts = np.maximum(np.ceil(seg[:, 6] / step).astype(int), 1)
    which = np.repeat(np.arange(len(seg)), counts)
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    t = (offsets + 0.5) / counts[which] * seg[which, 6]
    points = seg[which, 0:3] + seg[which, 3:6] * t[:, None]
    return np.column_stack([points, seg[which, 7], (seg[:, 6] / counts)[which]])


def _render_vessels(points, pat: _Patient, size: int, dx: float) -> np.ndarray:
    """Partial-volume occupancy (0..1) of the vessels in each voxel.

    Each sample's volume is spread over its slab with a Gaussian footprint as wide as the
    vessel (the variance of a disc of radius ``r`` is ``r**2 / 4``), so a vessel running along
    z fills its pixels while a thin one lying in the slab only tints them.
    """
    n_voxels = size * size * pat.n_slices
    fi = (points[:, 0] + pat.cx) / dx + (size - 1) / 2.0
    fj = (points[:, 1] + pat.cy) / dx + (size - 1) / 2.0
    kz = np.rint(points[:, 2] / SLICE_SPACING_MM).astype(np.int64)
    radius = points[:, 3]
    volume = np.pi * radius**2 * points[:, 4] / (dx * dx * SLICE_SPACING_MM)
    sigma = np.sqrt((0.5 * radius / dx) ** 2 + 1.0 / 12.0)
    half = np.ceil(2.5 * sigma).astype(int)
    valid = (kz >= 0) & (kz < pat.n_slices) & (fi > -half) & (fi < size + half) & (fj > -half) & (fj < size + half)
    flats, weights = [], []
    for width in np.unique(half[valid]):
        sel = valid & (half == width)
        off = np.arange(-width, width + 1)
        ii = np.floor(fi[sel]).astype(np.int64)[:, None] + off  # (n, K)
        jj = np.floor(fj[sel]).astype(np.int64)[:, None] + off
        s2 = 2.0 * sigma[sel][:, None] ** 2
        gi = np.exp(-((ii - fi[sel][:, None]) ** 2) / s2)
        gj = np.exp(-((jj - fj[sel][:, None]) ** 2) / s2)
        norm = volume[sel] / (gi.sum(axis=1) * gj.sum(axis=1))
        w = (gi * norm[:, None])[:, :, None] * gj[:, None, :]
        ok = ((ii >= 0) & (ii < size))[:, :, None] & ((jj >= 0) & (jj < size))[:, None, :]
        flat = (ii[:, :, None] * size + jj[:, None, :]) * pat.n_slices + kz[sel][:, None, None]
        flats.append(flat[ok])
        weights.append(w[ok])
    if not flats:
        return np.zeros((size, size, pat.n_slices), dtype=np.float32)
    occupancy = np.bincount(np.concatenate(flats), weights=np.concatenate(weights), minlength=n_voxels)
    occupancy = np.minimum(VESSEL_GAIN * occupancy, 1.0).astype(np.float32)
    return occupancy.reshape(size, size, pat.n_slices)


# --- Lesions -------------------------------------------------------------------------------------
@dataclass
class _Lesion:
    first: int  # first slice
    centres: np.ndarray  # (n, 2) X, Y per slice, mm
    radius: float  # mm, before the study's calibrated scale
    elongation: float
    ggo_hu: float
    consolidation_hu: float | None

    @property
    def slices(self) -> range:
        return range(self.first, self.first + len(self.centres))

    def profile(self, z_index: int) -> float:
        """Cross-section scale on a slice: 1 mid-way, 0.7 at the first and last slice."""
        n = len(self.centres)
        return 0.7 + 0.3 * np.sin(np.pi * (z_index - self.first + 0.5) / n)


def _lesion_targets(study_id, involvement, n_slices, rng):
    """(lesion_percent of the volume or None, share of the lung or None, lesion slices)."""
    if involvement == "CT-0":
        return None, None, 0
    if involvement == "CT-1":
        facts = mask_facts()
        if study_id in facts:
            fact = facts[study_id]
        else:
            fact = facts[sorted(facts)[int(rng.integers(len(facts)))]]
        slices = int(round(fact["lesion_slices"] * n_slices / fact["slices"]))
        return fact["lesion_percent"], None, max(slices, 1)
    return None, float(rng.uniform(*INVOLVEMENT[involvement])), n_slices


def _plan_lesions(pat: _Patient, lungs: _LungMap, rng, involvement, n_lesion_slices, volume_percent, lung_share):
    """Place lesions on the planning grid (independent of the output size)."""
    n = PLANNING_PIXELS
    fov = pat.dx512 * 512.0
    dxp = lungs.step
    Xp, Yp = lungs.xs[:, None, None], lungs.ys[None, :, None]
    lung = lungs.slices()
    area = lung.sum(axis=(0, 1)) * dxp * dxp
    eligible = area >= 0.08 * area.max()
    # the longest contiguous run of eligible slices
    best, start = (0, 0), None
    for z in range(pat.n_slices + 1):
        if z < pat.n_slices and eligible[z]:
            start = z if start is None else start
        elif start is not None:
            best = max(best, (z - start, start))
            start = None
    run_len, run_start = best
    severe = involvement in ("CT-2", "CT-3", "CT-4")
    count = run_len if severe else min(n_lesion_slices, run_len)
    if count == 0:
        return [], []
    first = run_start + int(rng.beta(1.3, 1.8) * (run_len - count + 1))
    first = min(first, run_start + run_len - count)
    # tile the run with lesions
    spans = []
    z = first
    while z < first + count:
        length = int(min(rng.integers(1, 6), first + count - z))
        spans.append((z, length))
        extra = int(rng.integers(1, 4)) if severe else int(rng.integers(0, 3))
        for _ in range(extra):
            sub = int(rng.integers(1, length + 1))
            spans.append((z + int(rng.integers(0, length - sub + 1)), sub))
        z += length - int(length > 2 and rng.random() < 0.4)
    if severe:
        target_area = lung_share * area[first : first + count].mean()
    else:
        target_area = volume_percent / 100.0 * fov * fov * pat.n_slices / count
    # lesions sharing their slices with many others are smaller, so that the lesion area per
    # slice stays about even along the run, as in the real masks
    active = np.zeros(pat.n_slices)
    for z0, length in spans:
        active[z0 : z0 + length] += 1

    @functools.lru_cache(maxsize=None)
    def depth(z):  # distance to the pleura on slice z, mm
        return ndimage.distance_transform_edt(lung[:, :, z]) * dxp

    def snap(c, z, want):
        """The point nearest to ``c`` on slice ``z`` at least ``want`` mm inside the lung."""
        ok = depth(z) >= min(max(want, dxp), depth(z).max())
        i = int(np.clip(np.rint((c[0] - lungs.xs[0]) / dxp), 0, n - 1))
        j = int(np.clip(np.rint((c[1] - lungs.ys[0]) / dxp), 0, n - 1))
        if ok[i, j]:
            return c
        oi, oj = np.nonzero(ok)
        nearest = np.argmin((oi - i) ** 2 + (oj - j) ** 2)
        return np.array([lungs.xs[oi[nearest]], lungs.ys[oj[nearest]]])

    def lesion(first, centres, radius, consolidating):
        return _Lesion(
            first=first,
            centres=np.array(centres),
            radius=radius,
            elongation=float(rng.uniform(1.1, 1.8)),
            ggo_hu=float(rng.uniform(*GROUND_GLASS_HU)),
            consolidation_hu=float(rng.uniform(*CONSOLIDATION_HU)) if consolidating else None,
        )

    periphery = pat.cavity(Xp, Yp)[:, :, 0] > (0.35 if severe else 0.55)
    consolidation_chance = {"CT-1": 0.35, "CT-2": 0.45, "CT-3": 0.55, "CT-4": 0.6}[involvement]
    lesions = []
    for z0, length in spans:
        crowd = active[z0 : z0 + length].mean()
        radius = np.sqrt(target_area / (np.pi * crowd)) * float(np.exp(rng.normal(0.0, 0.25)))
        want = radius * rng.uniform(0.15, 0.6) if not severe else radius * rng.uniform(0.2, 1.5)
        mid = z0 + length // 2
        cand_depth = depth(mid)
        cand = (cand_depth > 0) & (cand_depth <= max(want, dxp) + dxp) & (cand_depth >= min(want, cand_depth.max()) - dxp)
        if not severe:
            cand &= periphery
        if not cand.any():
            cand = cand_depth > 0
        ii, jj = np.nonzero(cand)
        posterior = np.exp(-(Yp[0, jj, 0] - pat.y_vb) / (0.8 * (pat.b_ant + pat.b_post)))
        pick = rng.choice(len(ii), p=posterior / posterior.sum())
        anchor = np.array([Xp[ii[pick], 0, 0], Yp[0, jj[pick], 0]]) + rng.uniform(-0.5, 0.5, 2) * dxp
        drift = np.cumsum(rng.normal(0.0, 2.0 * pat.k, (length, 2)), axis=0)
        drift -= drift[length // 2]
        centres = [snap(anchor + drift[step], zz, want) for step, zz in enumerate(range(z0, z0 + length))]
        lesions.append(lesion(z0, centres, radius, rng.random() < consolidation_chance))
        # small satellite patches around it, on its own slices: real masks are fragmented
        for _ in range(int(rng.integers(*LESION_SATELLITES))):
            step = int(rng.integers(length))
            sat_len = int(min(rng.integers(1, 3), length - step))
            angle = rng.uniform(0.0, 2.0 * np.pi)
            offset = radius * rng.uniform(0.9, 2.0) * np.array([np.cos(angle), np.sin(angle)])
            sat_radius = radius * rng.uniform(0.12, 0.35)
            sat = [snap(centres[step] + offset, z0 + step + i, sat_radius) for i in range(sat_len)]
            lesions.append(lesion(z0 + step, sat, sat_radius, False))
    return lesions, list(range(first, first + count))


def _render_lesions(pat, lesions, planned, lung3d, xs, ys, irregular, target_voxels):
    """The lesion field on the lung voxels of the planned slices.

    Each voxel takes the nearest lesion's normalised radius ``rho`` (an ellipse along the
    pleura, times the slice's edge modulation ``irregular(z)``); one scale for the whole study
    is then chosen so that exactly ``target_voxels`` voxels have ``rho / scale <= 1``, i.e. a
    weight ``w = 2 ** -(rho / scale) ** 2 >= 0.5`` (the mask). Every planned slice keeps at
    least one voxel, so the lesion slices are the planned ones at any size.

    Returns:
        ``(flat, owner, w)``: flat voxel indices, the lesion owning each and its weight, or
        ``None`` if there is no lung voxel to place lesions on.
    """
    size = lung3d.shape[0]
    rho_all, idx_all, owner_all = [], [], []
    for z in planned:
        active = [m for m, les in enumerate(lesions) if z in les.slices]
        ii, jj = np.nonzero(lung3d[:, :, z])
        if not active or ii.size == 0:
            continue
        X, Y = xs[ii], ys[jj]
        mod = irregular(z)[ii, jj]
        rho = np.empty((len(active), ii.size))
        for row, m in enumerate(active):
            les = lesions[m]
            c = les.centres[z - les.first]
            theta = np.arctan2(c[1], c[0])  # radial direction from the chest's centre
            u = -np.sin(theta) * (X - c[0]) + np.cos(theta) * (Y - c[1])  # along the pleura
            v = np.cos(theta) * (X - c[0]) + np.sin(theta) * (Y - c[1])  # towards it
            r = les.radius * les.profile(z)
            e = np.sqrt(les.elongation)
            rho[row] = np.sqrt((u / (r * e)) ** 2 + (v / (r / e)) ** 2) * mod
        best = rho.argmin(axis=0)
        rho_all.append(rho[best, np.arange(ii.size)])
        idx_all.append((ii * size + jj) * pat.n_slices + z)
        owner_all.append(np.asarray(active)[best])
    if not rho_all:
        return None
    rho = np.concatenate(rho_all)
    flat = np.concatenate(idx_all)
    owner = np.concatenate(owner_all)
    target = int(np.clip(round(target_voxels), 1, rho.size))
    scale = np.partition(rho, target - 1)[target - 1] * (1.0 + 1e-9)
    q = rho / scale
    # every planned slice keeps at least its most central voxel
    zs = flat % pat.n_slices
    for z in planned:
        on = zs == z
        if on.any() and not (q[on] <= 1.0).any():
            q[np.flatnonzero(on)[q[on].argmin()]] = 0.99
    w = np.exp2(-(q**2))
    return flat, owner, w


def generate_study(
    study_id: int,
    size: int = 512,
    n_slices: int | None = None,
    involvement: str = "CT-1",
    seed: int = 0,
    return_labels: bool = False,
):
    """Generate one synthetic chest-CT study.

    Args:
        study_id: The study's number; with ``seed`` it fixes everything
            (``np.random.default_rng([seed, study_id])``).
        size: In-plane size in pixels; the physical field of view is kept, so pixels are
            ``dx * 512 / size`` mm with ``dx`` drawn in 0.6..0.9 mm.
        n_slices: Axial slices; by default the real study's count for the annotated ids, else
            a count drawn in 33..53.
        involvement: Category: ``'CT-0'`` (no lesion), ``'CT-1'`` (the real study's lesion burden
            for the annotated ids, another real study's otherwise), ``'CT-2'``, ``'CT-3'``,
            ``'CT-4'`` (25-50%, 50-75%, over 75% of the lungs).
        seed: The dataset's seed.
        return_labels: Also return the label map (classes :data:`LABEL_NAMES`).

    Returns:
        ``(hu, mask, affine)``, plus ``labels`` if ``return_labels``: ``hu`` int16 HU; ``mask``
        int16 in {0, 1} (ground glass and consolidation) for the annotated ids
        (:data:`covidseg.mosmed.ANNOTATED_IDS`), ``None`` for the others; ``affine`` the 4x4
        LAS voxel-to-world matrix; ``labels`` uint8, the tissue of each voxel
        (:data:`LABEL_NAMES`; the mask is :data:`LESION_LABELS`).

    Shape:
        ``hu``, ``mask``, ``labels``: ``(size, size, Z)``, axis 0 to the patient's left, axis 1
        anterior, axis 2 superior (LAS).

    Raises:
        ValueError: For an unknown category, a size under 32 or fewer than 8 slices.
    """
    if involvement not in CATEGORIES:
        raise ValueError(f"unknown involvement {involvement!r}; valid: {', '.join(CATEGORIES)}")
    if int(size) < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} pixels, got {size}")
    if n_slices is not None and int(n_slices) < 8:
        raise ValueError(f"n_slices must be at least 8, got {n_slices}")
    size = int(size)
    real_slices = mask_facts()[study_id]["slices"] if study_id in mask_facts() else None
    if n_slices is None:
        n_slices = real_slices
    root_rng = np.random.default_rng([seed, study_id])
    body_rng, lesion_rng, noise_rng = root_rng.spawn(3)

    facts = mask_facts().get(study_id)
    min_lung = facts["lesion_slices"] if facts else 0
    pat = _draw_patient(body_rng, n_slices, min_lung)
    Z = pat.n_slices
    dx = pat.dx512 * 512.0 / size
    coords = (np.arange(size) - (size - 1) / 2.0) * dx
    xs = (coords - pat.cx).astype(np.float32)  # body-centred mm along axis 0
    ys = (coords - pat.cy).astype(np.float32)  # and axis 1
    texture_low = _smooth_noise(body_rng, (32, 32, Z), (1.5, 1.5, 0.8))
    lungs = _LungMap.build(pat)
    points = _sample_vessels(_vessel_tree(pat, lungs, body_rng), VESSEL_STEP_PIXELS * dx)

    hu = np.empty((size, size, Z), dtype=np.float32)
    labels = np.empty((size, size, Z), dtype=np.uint8)
    lung3d = np.empty((size, size, Z), dtype=bool)
    lung_texture = np.empty((size, size, Z), dtype=np.float32)
    for z in range(Z):
        tex = _upsample(texture_low[:, :, z], size).astype(np.float32)
        hu[:, :, z], labels[:, :, z], lung3d[:, :, z] = pat.render_slice(xs, ys, z * SLICE_SPACING_MM, tex)
        lung_texture[:, :, z] = tex

    # lesions go under the vessels
    percent, share, n_les = _lesion_targets(study_id, involvement, Z, lesion_rng)
    lesion_mask = np.zeros((size, size, Z), dtype=bool)
    if involvement != "CT-0":
        lesions, planned = _plan_lesions(pat, lungs, lesion_rng, involvement, n_les, percent, share)
        coarse = _smooth_noise(lesion_rng, (24, 24, Z), (1.2, 1.2, 0.7))
        fine = _smooth_noise(lesion_rng, (64, 64, Z), (1.0, 1.0, 0.5))
        amp_c, amp_f = LESION_EDGE_IRREGULARITY

        def irregular(z):  # multiplies the lesions' normalised radius
            return np.exp(amp_c * _upsample(coarse[:, :, z], size) + amp_f * _upsample(fine[:, :, z], size))

        target = percent / 100.0 * size * size * Z if share is None else share * lung3d.sum()
        rendered = _render_lesions(pat, lesions, planned, lung3d, xs, ys, irregular, target) if lesions else None
        if rendered is not None:
            flat, owner, w = rendered
            base = hu.reshape(-1)[flat]
            ggo = np.array([les.ggo_hu for les in lesions])[owner] + 35.0 * lung_texture.reshape(-1)[flat]
            g = _smoothstep((w - 0.2) / 0.6)
            value = base + g * (ggo - base)
            cons_hu = np.array([np.nan if les.consolidation_hu is None else les.consolidation_hu for les in lesions])[owner]
            c = np.where(np.isnan(cons_hu), 0.0, _smoothstep((w - 0.78) / 0.14))
            value = value + c * (np.nan_to_num(cons_hu) - value)
            hu.reshape(-1)[flat] = value
            in_mask = w >= 0.5
            lesion_mask.reshape(-1)[flat[in_mask]] = True
            labels.reshape(-1)[flat[in_mask]] = np.where(c[in_mask] > 0.5, CONSOLIDATION, GROUND_GLASS)

    occupancy = _render_vessels(points, pat, size, dx)
    occupancy[~lung3d] = 0.0
    hu += occupancy * (BLOOD_HU - hu)
    labels[(occupancy > 0.5) & ~lesion_mask & lung3d] = LUNG_VESSEL

    hu += noise_rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(pat.noise_std)
    hu_int = np.clip(np.rint(hu), *HU_RANGE).astype(np.int16)
    mask = lesion_mask.astype(np.int16) if study_id in ANNOTATED_IDS else None

    ox, oy, oz = pat.origin
    affine = np.array(
        [
            [-dx, 0.0, 0.0, ox + dx * (size - 1) / 2.0],
            [0.0, dx, 0.0, oy - dx * (size - 1) / 2.0],
            [0.0, 0.0, SLICE_SPACING_MM, oz],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    if return_labels:
        return hu_int, mask, affine, labels
    return hu_int, mask, affine


# --- Writing the dataset -----------------------------------------------------------------------
def phantom_studies(annotated_ids=ANNOTATED_IDS, unannotated: bool = True) -> list[tuple[int, str]]:
    """``(study_id, category)`` of the phantom's studies, sorted by id."""
    studies = [(int(i), "CT-1") for i in annotated_ids]
    if unannotated:
        studies += [(i, cat) for cat, ids in UNANNOTATED_IDS.items() for i in ids]
    return sorted(studies)


def _image(array: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    image = nib.Nifti1Image(array, affine)
    header = image.header
    header.set_data_dtype(np.int16)
    header.set_xyzt_units("mm", "sec")
    header["descrip"] = PHANTOM_DESCRIPTION.encode()
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return image


def _marker_text(size: int, seed: int, studies: list[Study]) -> str:
    annotated = sum(s.mask is not None for s in studies)
    return (
        "SYNTHETIC PHANTOM - NOT PATIENT DATA\n"
        "\n"
        "Every CT volume and mask in this folder was generated by covidseg.phantom. It imitates\n"
        "the layout of MosMedData COVID19_1110 so that the same code reads it, but it contains no\n"
        "patient data, and results computed on it say nothing about real CT.\n"
        "\n"
        f"generator: covidseg {__version__}\n"
        f"phantom_version: {PHANTOM_VERSION}\n"
        f"seed: {seed}\n"
        f"size: {size}\n"
        f"studies: {len(studies)}\n"
        f"annotated: {annotated}\n"
        "in_plane_spacing: drawn per study in 0.6..0.9 mm at 512 px, times 512/size (the field of\n"
        "  view of the chest is kept at every size)\n"
        f"slice_spacing_mm: {SLICE_SPACING_MM:g}\n"
    )


def _write_into(folder: Path, size, seed, annotated_ids, unannotated, progress) -> list[Study]:
    from tqdm.auto import tqdm

    plan = phantom_studies(annotated_ids, unannotated)
    studies = []
    with tqdm(plan, desc="Writing synthetic phantom (not patient data)", unit="study", disable=not progress) as bar:
        for study_id, category in bar:
            hu, mask, affine = generate_study(study_id, size=size, involvement=category, seed=seed)
            image = write_image_atomically(_image(hu, affine), study_path(folder, study_id, category))
            mask_file = None
            if mask is not None:
                mask_file = write_image_atomically(_image(mask, affine), mask_path(folder, study_id))
            studies.append(Study(study_id, category, image, mask_file))
    write_registry(folder, studies)
    (folder / PHANTOM_MARKER).write_text(_marker_text(size, seed, studies), encoding="utf-8")
    return studies


def _generate_atomically(root: Path, size, seed, annotated_ids, unannotated, progress, reuse: bool):
    """Write into a hidden sibling folder and rename it to ``root`` at the end."""
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    except OSError as exc:
        raise DataError(root, f"cannot write the phantom here ({exc.strerror or exc})") from None
    try:
        studies = _write_into(tmp, size, seed, annotated_ids, unannotated, progress)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, root)  # atomic; replaces an empty folder, fails on a non-empty one
        except OSError:
            if reuse and is_phantom(root):
                return None  # another process finished first: keep its copy, discard ours
            raise DataError(root, "already exists and is not empty; remove it or choose another folder") from None
        moved = lambda p: None if p is None else root / p.relative_to(tmp)  # noqa: E731
        return [Study(s.study_id, s.category, moved(s.image), moved(s.mask)) for s in studies]
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_phantom(
    root: str | os.PathLike,
    size: int = 512,
    seed: int = 0,
    annotated_ids=ANNOTATED_IDS,
    unannotated: bool = True,
    progress: bool = True,
) -> list[Study]:
    """Write the synthetic phantom in MosMedData's layout.

    Writes ``studies/CT-k/study_NNNN.nii.gz``, ``masks/study_NNNN_mask.nii.gz``,
    ``dataset_registry.csv`` (the studies written) and :data:`PHANTOM_MARKER`. The files are
    generated in a hidden sibling folder that is renamed to ``root`` at the end, so an
    interrupted run never leaves a partial dataset.

    Args:
        root: The folder to create (it may exist if empty).
        size: In-plane size in pixels (the field of view is kept; see the module's notes).
        seed: The dataset's seed; the same seed gives byte-identical files.
        annotated_ids: The CT-1 studies to write with masks (default: all 50).
        unannotated: Also write the two unannotated studies of CT-0, CT-2, CT-3 and CT-4.
        progress: Show a progress bar.

    Returns:
        The studies written, sorted by id.

    Raises:
        DataError: If ``root`` exists and is not empty, or cannot be written.
        ValueError: For a size under 32 or an id outside 255..304 in ``annotated_ids``.
    """
    root = Path(root)
    unknown = sorted(set(annotated_ids) - set(ANNOTATED_IDS))
    if unknown:
        raise ValueError(f"annotated_ids must be among 255..304 (the annotated CT-1 studies); got {unknown}")
    if int(size) < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} pixels, got {size}")
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(root, "already exists and is not empty; remove it or choose another folder")
    return _generate_atomically(root, size, seed, annotated_ids, unannotated, progress, reuse=False)


def is_phantom(root: str | os.PathLike) -> bool:
    """Whether ``root`` is a (complete) phantom folder: its marker file is written last."""
    return (Path(root) / PHANTOM_MARKER).is_file()


def default_phantom_dir(size: int, seed: int = 0) -> Path:
    """The phantom's cache folder: ``$COVIDSEG_CACHE``, else ``$XDG_CACHE_HOME/covidseg``, else
    ``~/.cache/covidseg``, then ``phantom-v{PHANTOM_VERSION}-{size}px-seed{seed}``."""
    if os.environ.get("COVIDSEG_CACHE"):
        cache = Path(os.environ["COVIDSEG_CACHE"])
    elif os.environ.get("XDG_CACHE_HOME"):
        cache = Path(os.environ["XDG_CACHE_HOME"]) / "covidseg"
    else:
        cache = Path.home() / ".cache" / "covidseg"
    return cache / f"phantom-v{PHANTOM_VERSION}-{int(size)}px-seed{int(seed)}"


def ensure_phantom(size: int = 128, seed: int = 0, root: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Return the cached phantom folder, generating it on first use.

    A folder counts as complete only once its marker exists. Concurrent callers each generate
    into their own hidden folder; the first rename wins and the others discard their copy.

    Args:
        size: In-plane size in pixels.
        seed: The dataset's seed.
        root: The folder; default :func:`default_phantom_dir`.
        progress: Show a progress bar while generating.

    Returns:
        The phantom folder.

    Raises:
        DataError: If ``root`` exists, is not empty and is not a phantom, or cannot be written.
    """
    root = Path(root) if root is not None else default_phantom_dir(size, seed)
    if is_phantom(root):
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(root, f"exists but is not a complete phantom (no {PHANTOM_MARKER}); remove it")
    _generate_atomically(root, size, seed, ANNOTATED_IDS, True, progress, reuse=True)
    return root
