"""The pulmonary vessel tree: grown on a planning grid of the lungs, rendered with partial volume."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .anatomy import _Patient
from .constants import SLICE_SPACING_MM


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
AIRWAY_MIN_ARTERY_MM = 1.1  # the thinnest artery that has a visible bronchus beside it
AIRWAY_RADIUS_RATIO = 0.8  # a bronchus's lumen radius over its artery's
AIRWAY_WALL_RATIO = 2.0  # squared outer radius of a bronchus's wall over its lumen's
LUNG_MAP_STEP_MM = SLICE_SPACING_MM  # vessels are drawn on the nearest slice, and clipped to its lungs


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
        The segments, shape ``(N, 9)``: start (X, Y, z in mm), unit direction, length and
        radius (mm), and the index of the root in :data:`TREE_ROOTS` (0: arteries, 1: veins).
    """
    k = pat.k
    inside = lungs.inside

    # all roots grow together, one generation at a time
    starts, dirs, radii, kinds = [], [], [], []
    for side in (-1.0, 1.0):
        for kind, (dh, dy, r_scale, up) in enumerate(TREE_ROOTS):
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
            kinds.append(np.full(TREE_TRUNKS, float(kind)))
    starts, dirs, radii, kinds = np.concatenate(starts), np.concatenate(dirs), np.concatenate(radii), np.concatenate(kinds)
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
        segments.append(np.column_stack([starts, dirs, lengths, radii, kinds]))
        parent = (kept == len(fractions)) & (radii * 0.8 >= VESSEL_MIN_RADIUS_MM)
        if not parent.any():
            break
        d, r, o, kind = dirs[parent], radii[parent], origin[parent], kinds[parent]
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
        starts, origin, kinds = np.concatenate([ends, ends]), np.concatenate([o, o]), np.concatenate([kind, kind])
        keep = radii >= VESSEL_MIN_RADIUS_MM
        starts, dirs, radii, origin, kinds = starts[keep], dirs[keep], radii[keep], origin[keep], kinds[keep]
    return np.concatenate(segments)


def _airway_tree(segments: np.ndarray) -> np.ndarray:
    """Bronchi beside the pulmonary arteries (bronchovascular bundles): a tube of
    :data:`AIRWAY_RADIUS_RATIO` times the artery's radius, alongside each arterial segment at least
    :data:`AIRWAY_MIN_ARTERY_MM` thick, in the same format as :func:`_vessel_tree`'s segments."""
    arteries = segments[(segments[:, 8] == 0) & (segments[:, 7] >= AIRWAY_MIN_ARTERY_MM)]
    d = arteries[:, 3:6]
    side = np.column_stack([d[:, 1], -d[:, 0], np.zeros(len(d))])
    side /= np.linalg.norm(side, axis=1, keepdims=True) + 1e-12
    radius = AIRWAY_RADIUS_RATIO * arteries[:, 7]
    gap = arteries[:, 7] + np.sqrt(AIRWAY_WALL_RATIO) * radius
    airways = arteries.copy()
    airways[:, 0:3] += side * gap[:, None]
    airways[:, 7] = radius
    return airways


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
