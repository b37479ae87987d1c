"""Lung masks of a chest-CT study, right and left lung apart, by the field's classical steps.

The method follows Hu, Hoffman and Reinhardt (2001), "Automatic lung segmentation for accurate
quantitation of volumetric X-ray CT images", IEEE TMI 20(6):490-498, with the pathological-lung
refinements reviewed by Sluimer et al. (2006), IEEE TMI 25(4):385-405, all on
:mod:`scipy.ndimage`:

1. **Body.** Voxels denser than :data:`BODY_ABOVE_HU`; the largest 3D component, opened first so
   that a table or arms touching the body fall away, its holes filled slice by slice. Air outside
   the body, the scanner's padding outside the reconstruction circle (-2048, -3024 HU) and the
   table's hollow parts are therefore never lung.
2. **Air inside the body.** Voxels below :data:`LUNG_BELOW_HU` in the body. The threshold lies
   above ground glass (-700..-300 HU) so that hazy lesions stay lung.
3. **Airways.** Per slice, small air components near the body's sagittal midline (the trachea
   and main bronchi, :data:`AIRWAY_MAX_AREA_MM2`) are removed.
4. **Lungs.** The 3D components of what is left, largest first; components of under
   :data:`MIN_LUNG_ML` (bowel gas, air between the arms and the chest) are dropped. Two large
   components are the two lungs: the largest, and the largest on the other side of the body's
   sagittal midline; other large components within :data:`FISSURE_GAP_MM` of a lung are lobes of
   it that a complete fissure cut off. One component spanning both sides (lungs touching at the anterior
   junction) is split by eroding it until it falls apart in two, then giving every voxel to the
   nearer part; where erosion does not split it, by a cut at the body's sagittal midline. A side
   left with under :data:`MIN_SIDE_FRACTION` of the other's volume is a failed split.
5. **Dense lesions.** Each lung is closed with an ellipsoid of :data:`CLOSING_RADIUS_MM` (the
   "rolling ball" that takes juxtapleural lesions back in, here in 3D, so that the aerated lung of
   the neighbouring slices outlines a slice that lesion fills) and its holes are filled slice by
   slice, so that consolidation inside or against the lung's edge stays lung.
6. **Right and left** in the patient's sense come from the affine: the lung whose centre lies
   further towards world +x (RAS: the patient's right) is the right lung.

The steps are written in millimetres, so that the result does not depend on the pixel size. They
run on an in-plane grid of about :data:`GRID_MM` (a 512-pixel study is averaged in 2 x 2 blocks),
and the edge of each lung is then redrawn on the study's own pixels.

Accuracy is measured on the synthetic phantom, whose lungs are known (``tests/test_lungs.py``); on
its CT-4 studies, where lesion fills over three quarters of the lungs, the Dice is lowest (about
0.90), as for every threshold-based method (Sluimer et al., 2006).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .config import LUNG_METHOD_NAMES
from .errors import DataError

__all__ = [
    "RIGHT",
    "LEFT",
    "LUNG_NAMES",
    "BODY_ABOVE_HU",
    "LUNG_BELOW_HU",
    "MIN_LUNG_ML",
    "CLOSING_RADIUS_MM",
    "AIRWAY_MAX_AREA_MM2",
    "LungError",
    "segment_lungs",
    "lungmask_lungs",
    "LUNG_METHODS",
    "lung_labels",
]

RIGHT, LEFT = 1, 2
"""Labels of the lung mask: 1 the right lung, 2 the left lung (in the patient's sense)."""

LUNG_NAMES = {RIGHT: "right", LEFT: "left"}

BODY_ABOVE_HU = -500.0
"""Voxels denser than this are tissue: the body, the table, the arms."""

LUNG_BELOW_HU = -200.0
"""Voxels of the body lighter than this are air, aerated lung or ground glass."""

MIN_LUNG_ML = 50.0
"""Air components smaller than this are not a lung (a study whose largest is smaller has no lungs)."""

CLOSING_RADIUS_MM = (12.0, 40.0)
"""In-plane and axial radii of the ellipsoid closing that takes dense lesions against the lung's
edge back into the lung (the "rolling ball"); the axial radius spans the neighbouring slices, whose
aerated lung outlines a lesion that fills a slice."""

GRID_MM = 1.5
"""The steps run on an in-plane grid of about this pixel size (blocks of whole pixels averaged),
and the labels are brought back to the study's pixels."""

AIRWAY_MAX_AREA_MM2 = 500.0
"""Air components of a slice smaller than this (a trachea is about 2 cm², a main bronchus 1.3 cm²),
lying near the body's midline, are airways."""

AIRWAY_MIDLINE_MM = 45.0
"""How far from the body's sagittal midline an airway's centre may lie."""

FISSURE_GAP_MM = 3.0
"""Air components this close to a lung are lobes of it, cut off by a complete fissure."""

LUNG_MEDIAN_HU = (-950.0, -300.0)
"""Median HU of an air component that is lung parenchyma (aerated lung about -850, ground glass
-700..-300), not gas (stomach, bowel, airways: about -1000)."""

MIN_FOOTPRINT_OVERLAP = 0.5
"""Share of a separated lung-like component's axial footprint that must lie within the footprint of
the lung on its side for it to join that lung (a part cut off by consolidation filling a slice)."""

MAX_SPLIT_EROSIONS = 12
"""Most erosions (of one voxel each) tried to separate lungs joined at the anterior junction."""

MIN_SIDE_FRACTION = 0.1
"""A lung smaller than this fraction of the other one means the split failed."""


class LungError(DataError):
    """A study in which no lungs, or not two lungs, could be found."""


def _spacing(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((np.asarray(affine, dtype=float)[:3, :3] ** 2).sum(axis=0))


def _disc(radius_mm: float, spacing_xy) -> np.ndarray:
    rx, ry = (max(1, int(round(radius_mm / s))) for s in spacing_xy)
    x, y = np.ogrid[-rx : rx + 1, -ry : ry + 1]
    return (x * spacing_xy[0] / radius_mm) ** 2 + (y * spacing_xy[1] / radius_mm) ** 2 <= 1.0


def _per_slice(function, mask: np.ndarray) -> np.ndarray:
    out = np.empty_like(mask)
    for z in range(mask.shape[2]):
        out[:, :, z] = function(mask[:, :, z])
    return out


def _body(hu: np.ndarray, spacing) -> np.ndarray:
    """The patient's body: tissue, largest 3D component after an opening, holes filled per slice."""
    tissue = hu > BODY_ABOVE_HU
    opened = ndimage.binary_opening(tissue, structure=_disc(3.0, spacing[:2])[:, :, None])
    labels, n = ndimage.label(opened)
    if n == 0:
        return np.zeros(hu.shape, dtype=bool)
    sizes = ndimage.sum_labels(np.ones(hu.shape), labels, index=np.arange(1, n + 1))
    body = labels == 1 + int(np.argmax(sizes))
    body = ndimage.binary_dilation(body, structure=_disc(3.0, spacing[:2])[:, :, None]) & tissue | body
    return _per_slice(ndimage.binary_fill_holes, body)


def _remove_airways(air: np.ndarray, body: np.ndarray, spacing) -> np.ndarray:
    """Drop, slice by slice, the small air components near the body's midline."""
    pixel_mm2 = spacing[0] * spacing[1]
    out = air.copy()
    for z in range(air.shape[2]):
        columns = np.nonzero(body[:, :, z].any(axis=1))[0]
        if columns.size == 0:
            continue
        midline = 0.5 * (columns[0] + columns[-1])
        labels, n = ndimage.label(air[:, :, z])
        if n == 0:
            continue
        index = np.arange(1, n + 1)
        areas = ndimage.sum_labels(np.ones(labels.shape), labels, index) * pixel_mm2
        centres = np.array(ndimage.center_of_mass(np.ones(labels.shape), labels, index))[:, 0]
        airway = (areas < AIRWAY_MAX_AREA_MM2) & (np.abs(centres - midline) * spacing[0] < AIRWAY_MIDLINE_MM)
        if airway.any():
            out[:, :, z] &= ~np.isin(labels, index[airway])
    return out


def _split(joined: np.ndarray, midline: float) -> tuple[np.ndarray, np.ndarray]:
    """Two parts of one component holding both lungs: erode until it falls apart, then give every
    voxel to the nearer part; else cut it at the body's sagittal midline (index ``midline`` of
    axis 0)."""
    core = joined
    for _ in range(MAX_SPLIT_EROSIONS):
        core = ndimage.binary_erosion(core, structure=np.ones((3, 3, 1), dtype=bool))
        labels, n = ndimage.label(core)
        if n >= 2:
            sizes = ndimage.sum_labels(np.ones(core.shape), labels, np.arange(1, n + 1))
            first, second = np.argsort(sizes)[::-1][:2] + 1
            if sizes[second - 1] >= MIN_SIDE_FRACTION * sizes[first - 1]:
                seeds = np.where(labels == first, 1, np.where(labels == second, 2, 0))
                nearest = ndimage.distance_transform_edt(seeds == 0, return_distances=False, return_indices=True)
                owner = seeds[tuple(nearest)]
                return joined & (owner == 1), joined & (owner == 2)
        elif n == 0:
            break
    side = np.arange(joined.shape[0])[:, None, None] < midline
    return joined & side, joined & ~side


def _fill_lesions(lung: np.ndarray, spacing) -> np.ndarray:
    """Close one lung with an ellipsoid (:data:`CLOSING_RADIUS_MM`) and fill its holes slice by
    slice, so that dense lesions inside or against the lung's edge stay lung.

    The closing is computed with Euclidean distance transforms (a dilation and an erosion by a
    ball are thresholds of the distance to the mask and to its complement), so its cost does not
    grow with the radius; the z axis is rescaled so that the ellipsoid becomes a ball.
    """
    if not lung.any():
        return lung
    radius, z_radius = CLOSING_RADIUS_MM
    sampling = (spacing[0], spacing[1], spacing[2] * radius / z_radius)
    pad = [int(np.ceil(radius / s)) + 1 for s in sampling]
    where = np.nonzero(lung)
    box = tuple(slice(max(0, int(idx.min()) - p), int(idx.max()) + p + 1) for idx, p in zip(where, pad))
    part = np.pad(lung[box], [(p, p) for p in pad])
    dilated = ndimage.distance_transform_edt(~part, sampling=sampling) <= radius
    closed = ndimage.distance_transform_edt(dilated, sampling=sampling) > radius
    closed = closed[tuple(slice(p, -p) for p in pad)] | lung[box]
    out = lung.copy()
    out[box] = _per_slice(ndimage.binary_fill_holes, closed)
    return out


def _segment(hu: np.ndarray, spacing, voxel_ml: float, path) -> tuple[np.ndarray, np.ndarray]:
    """The two lungs (unordered) on the grid of ``hu``, by the steps of the module's notes."""
    body = _body(hu, spacing)
    if not body.any():
        raise LungError(path, f"no body found (no voxel denser than {BODY_ABOVE_HU:g} HU): an empty volume?")
    air = _remove_airways((hu < LUNG_BELOW_HU) & body, body, spacing)
    labels, n = ndimage.label(air)
    sizes = ndimage.sum_labels(np.ones(air.shape), labels, np.arange(1, n + 1)) * voxel_ml if n else np.zeros(0)
    large = [int(i) + 1 for i in np.argsort(sizes)[::-1] if sizes[i] >= MIN_LUNG_ML]
    if not large:
        biggest = f"{sizes.max():.0f} mL" if n else "none"
        raise LungError(path, f"no lungs found: the largest air region inside the body is {biggest} (lungs hold over {MIN_LUNG_ML:.0f} mL)")
    columns = np.nonzero(body.any(axis=(1, 2)))[0]
    midline = 0.5 * (columns[0] + columns[-1])
    centres = {label: ndimage.center_of_mass(labels == label)[0] for label in large}
    first = labels == large[0]
    other_side = [label for label in large[1:] if (centres[label] < midline) != (centres[large[0]] < midline)]
    if other_side and sizes[other_side[0] - 1] >= MIN_SIDE_FRACTION * sizes[large[0] - 1]:
        second, used = labels == other_side[0], (large[0], other_side[0])
    else:
        (first, second), used = _split(first, midline), (large[0],)
    rest = [label for label in large if label not in used]
    first, second = _merge_lobes(labels, rest, first, second, spacing)
    first, second = _merge_cut_off_parts(labels, rest, hu, first, second, midline)
    if min(first.sum(), second.sum()) < MIN_SIDE_FRACTION * max(first.sum(), second.sum()):
        raise LungError(path, "the left and right lungs could not be separated (one side holds under a tenth of the air)")
    first, second = _fill_lesions(first, spacing), _fill_lesions(second, spacing)
    return first, second & ~first


def _merge_lobes(labels: np.ndarray, rest: list[int], first: np.ndarray, second: np.ndarray, spacing):
    """Add to each lung the other large air components that touch it across a fissure (within
    :data:`FISSURE_GAP_MM`): lobes that a complete fissure cut off."""
    disc = _disc(FISSURE_GAP_MM + max(spacing[:2]), spacing[:2])  # centres one gap and one pixel apart
    reach = np.zeros(disc.shape + (3,), dtype=bool)  # the disc in-plane, one slice up and down
    reach[:, :, 1] = disc
    reach[disc.shape[0] // 2, disc.shape[1] // 2, :] = True
    grown = [ndimage.binary_dilation(lung, structure=reach) for lung in (first, second)]
    for label in rest:
        part = labels == label
        touches = [np.count_nonzero(part & g) for g in grown]
        if max(touches) > 0:
            if touches[0] >= touches[1]:
                first = first | part
            else:
                second = second | part
    return first, second


def _merge_cut_off_parts(labels: np.ndarray, rest: list[int], hu: np.ndarray, first: np.ndarray, second: np.ndarray,
                         midline: float):
    """Add to each lung the large air components not yet taken that are lung parenchyma by their
    density (:data:`LUNG_MEDIAN_HU`) and lie over the lung on their side (:data:`MIN_FOOTPRINT_OVERLAP`
    of their axial footprint): parts that a consolidation filling whole slices cut off. The
    closing (:func:`_fill_lesions`) then takes the consolidation between them back in."""
    if not (first.any() and second.any()):
        return first, second  # a failed split, reported by the caller
    sides = [(first, ndimage.center_of_mass(first)[0] < midline), (second, ndimage.center_of_mass(second)[0] < midline)]
    footprints = [lung.any(axis=2) for lung, _ in sides]
    for label in rest:
        part = labels == label
        if (first & part).any() or (second & part).any():
            continue
        median = float(np.median(hu[part]))
        if not LUNG_MEDIAN_HU[0] <= median <= LUNG_MEDIAN_HU[1]:
            continue
        on_left_of_midline = ndimage.center_of_mass(part)[0] < midline
        footprint = part.any(axis=2)
        for k, (lung, side) in enumerate(sides):
            if side == on_left_of_midline and np.count_nonzero(footprint & footprints[k]) >= MIN_FOOTPRINT_OVERLAP * np.count_nonzero(footprint):
                if k == 0:
                    first = first | part
                else:
                    second = second | part
                break
    return first, second


def _block_mean(hu: np.ndarray, factors) -> np.ndarray:
    """``hu`` averaged over in-plane blocks of ``factors`` pixels (edge-padded to whole blocks)."""
    fx, fy = factors
    nx, ny = -(-hu.shape[0] // fx), -(-hu.shape[1] // fy)
    padded = np.pad(hu.astype(np.float32), ((0, nx * fx - hu.shape[0]), (0, ny * fy - hu.shape[1]), (0, 0)), mode="edge")
    return padded.reshape(nx, fx, ny, fy, -1).mean(axis=(1, 3))


def _upsample(mask: np.ndarray, factors, shape) -> np.ndarray:
    """A coarse mask repeated back onto the study's pixels."""
    return np.repeat(np.repeat(mask, factors[0], 0), factors[1], 1)[: shape[0], : shape[1]]


def _refine(mask: np.ndarray, hu: np.ndarray, factors) -> np.ndarray:
    """Redraw the edge of an upsampled mask on the study's pixels: within one coarse pixel of the
    edge, a pixel is lung where it is lighter than :data:`LUNG_BELOW_HU`."""
    structure = np.ones((2 * factors[0] + 1, 2 * factors[1] + 1, 1), dtype=bool)
    core = ndimage.binary_erosion(mask, structure=structure)
    band = ndimage.binary_dilation(mask, structure=structure) & ~core
    return core | (band & (hu < LUNG_BELOW_HU))


def segment_lungs(hu: np.ndarray, affine: np.ndarray, path=None) -> np.ndarray:
    """Right and left lung of a chest-CT study, by the classical steps of the module's notes.

    Args:
        hu: ``(X, Y, Z)`` intensities in Hounsfield units, axis 2 the axial one (as
            :func:`covidseg.nifti.load_volume` returns them).
        affine: The 4x4 voxel-to-world (RAS+, mm) matrix of ``hu``.
        path: The study's file, named in errors.

    Returns:
        uint8 ``(X, Y, Z)``: 0 background, :data:`RIGHT` (1) the right lung, :data:`LEFT` (2) the
        left lung.

    Raises:
        LungError: If the volume holds no lungs (no air component of :data:`MIN_LUNG_ML` inside
            the body, e.g. an empty volume or a head CT), or only one lung could be found.
    """
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {hu.shape}")
    affine = np.asarray(affine, dtype=float)
    spacing = _spacing(affine)
    voxel_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0
    factors = [max(1, int(round(GRID_MM / s))) for s in spacing[:2]]
    coarse = _block_mean(hu, factors) if max(factors) > 1 else hu
    coarse_spacing = np.array([spacing[0] * factors[0], spacing[1] * factors[1], spacing[2]])
    first, second = _segment(coarse, coarse_spacing, voxel_ml * factors[0] * factors[1], path)
    if max(factors) > 1:
        first, second = (_refine(_upsample(m, factors, hu.shape), hu, factors) for m in (first, second))
    world_x = [(affine[0, :3] @ np.array(ndimage.center_of_mass(part))) for part in (first, second)]
    right, left = (first, second) if world_x[0] > world_x[1] else (second, first)
    out = np.zeros(hu.shape, dtype=np.uint8)
    out[right] = RIGHT
    out[left] = LEFT
    return out


def lungmask_lungs(hu: np.ndarray, affine: np.ndarray, path=None) -> np.ndarray:
    """Right and left lung by the ``lungmask`` package (Hofmanninger et al., 2020, a U-Net R231).

    Raises:
        LungError: If ``lungmask`` is not installed or its weights cannot be loaded (offline).
    """
    try:
        from lungmask import LMInferer
    except ImportError:
        raise LungError(None, "--lungs lungmask needs the lungmask package (pip install lungmask); use --lungs classical") from None
    try:
        inferer = LMInferer()
    except Exception as exc:  # noqa: BLE001 - lungmask downloads its weights on first use
        raise LungError(None, f"lungmask's weights could not be loaded ({' '.join(str(exc).split())[:120]}); use --lungs classical") from None
    # lungmask reads arrays as SimpleITK returns them, (Z, Y, X) with x to the patient's left
    # and y posterior (LPS); the working orientation is LAS, so only the y axis turns round
    zyx = np.flip(np.transpose(np.asarray(hu), (2, 1, 0)), axis=1)
    result = np.flip(np.asarray(inferer.apply(zyx)), axis=1).transpose(2, 1, 0)
    # lungmask's R231 labels 1 the right lung and 2 the left one, as here
    return np.ascontiguousarray(result).astype(np.uint8)


LUNG_METHODS = dict(zip(LUNG_METHOD_NAMES, (segment_lungs, lungmask_lungs)))
"""Lung methods of ``--lungs``."""


def lung_labels(hu: np.ndarray, affine: np.ndarray, method: str = "classical", path=None) -> np.ndarray:
    """The lung mask of a study by ``method`` (:data:`LUNG_METHODS`); see :func:`segment_lungs`.

    Raises:
        ValueError: For an unknown method.
        LungError: As the method does.
    """
    if method not in LUNG_METHODS:
        raise ValueError(f"unknown lung method {method!r}; valid: {', '.join(LUNG_METHODS)}")
    return LUNG_METHODS[method](hu, affine, path)
