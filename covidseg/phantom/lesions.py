"""Lesions: their targets from the real masks' facts, their placement and their rendering."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..splits import mask_facts
from .anatomy import _Patient
from .constants import CONSOLIDATION_HU, GROUND_GLASS_HU, INVOLVEMENT
from .geometry import _upsample
from .vessels import PLANNING_PIXELS, _LungMap


LESION_EDGE_IRREGULARITY = (0.22, 0.12)  # log-amplitude of coarse and fine edge modulation
LESION_SATELLITES = (2, 9)  # range of small patches around each lesion
LESION_SPECKLE = 0.1  # log-amplitude of the pixel-scale edge modulation that fragments lesions as on real masks
SPECKLE_PIXELS = 512  # grid of the speckle over the field of view (the real masks' own grid)
SPECKLE_SIGMA = 0.8  # its correlation, in pixels of that grid


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


def _speckle(seed: int, z: int, size: int) -> np.ndarray:
    """A unit random field for slice ``z`` at the real masks' pixel scale: correlated over
    :data:`SPECKLE_SIGMA` pixels of a :data:`SPECKLE_PIXELS` grid over the field of view, drawn on
    the output grid (nearly white at sizes well under 512 px)."""
    grid = min(size, SPECKLE_PIXELS)
    rng = np.random.default_rng([seed, z])
    field = ndimage.gaussian_filter(rng.standard_normal((grid, grid), dtype=np.float32), SPECKLE_SIGMA * grid / SPECKLE_PIXELS, mode="wrap")
    field /= field.std() + 1e-12
    return field if grid == size else _upsample(field, size)
