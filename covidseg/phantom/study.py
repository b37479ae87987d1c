"""One synthetic study: body, lesions, vessels and noise assembled into HU, mask and labels."""

from __future__ import annotations

import numpy as np

from ..mosmed import ANNOTATED_IDS, CATEGORIES
from ..splits import mask_facts
from .acquisition import correlated_noise, draw_padding, outside_circle
from .anatomy import _draw_patient
from .constants import (
    AIR_HU,
    BLOOD_HU,
    CONSOLIDATION,
    GROUND_GLASS,
    HU_RANGE,
    LUNG_VESSEL,
    MIN_SIZE,
    SKIN_HU,
    SLICE_SPACING_MM,
)
from .geometry import _smooth_noise, _smoothstep, _upsample
from .lesions import LESION_EDGE_IRREGULARITY, LESION_SPECKLE, _lesion_targets, _plan_lesions, _render_lesions, _speckle
from .vessels import AIRWAY_WALL_RATIO, VESSEL_STEP_PIXELS, _airway_tree, _LungMap, _render_vessels, _sample_vessels, _vessel_tree


def generate_study(
    study_id: int,
    size: int = 512,
    n_slices: int | None = None,
    involvement: str = "CT-1",
    seed: int = 0,
    return_labels: bool = False,
    noise: bool = True,
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
        noise: Add the scanner's noise (``False`` gives the same study without it, to measure it).

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
    tree = _vessel_tree(pat, lungs, body_rng)
    points = _sample_vessels(tree, VESSEL_STEP_PIXELS * dx)
    bronchi = _sample_vessels(_airway_tree(tree), VESSEL_STEP_PIXELS * dx)

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
        speck_seed = int(lesion_rng.integers(2**63))

        def irregular(z):  # multiplies the lesions' normalised radius
            speck = _speckle(speck_seed, z, size)
            return np.exp(amp_c * _upsample(coarse[:, :, z], size) + amp_f * _upsample(fine[:, :, z], size) + LESION_SPECKLE * speck)

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

    # bronchi: a soft-tissue wall around an air lumen, then the vessels
    wall = bronchi.copy()
    wall[:, 3] *= np.sqrt(AIRWAY_WALL_RATIO)
    for tube, value in ((wall, SKIN_HU), (bronchi, AIR_HU)):
        occupancy = _render_vessels(tube, pat, size, dx)
        occupancy[~lung3d] = 0.0
        hu += occupancy * (value - hu)
    occupancy = _render_vessels(points, pat, size, dx)
    occupancy[~lung3d] = 0.0
    hu += occupancy * (BLOOD_HU - hu)
    labels[(occupancy > 0.5) & ~lesion_mask & lung3d] = LUNG_VESSEL

    padding = draw_padding(noise_rng)
    if noise:
        hu += correlated_noise(noise_rng, hu.shape, pat.noise_std, dx)
    hu_int = np.clip(np.rint(hu), *HU_RANGE).astype(np.int16)
    if padding is not None:
        hu_int[np.broadcast_to(outside_circle(size), hu_int.shape)] = padding
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
