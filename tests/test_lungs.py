"""The classical lung mask: accuracy on the phantom's known lungs, the patient's right and left, and
studies it must refuse or survive (padding, a table, arms, joined lungs, no lungs)."""

from __future__ import annotations

import functools
from importlib.util import find_spec

import numpy as np
import pytest

from covidseg.lungs import LEFT, RIGHT, LungError, lung_labels, segment_lungs
from covidseg.phantom import AIR, LUNG_LABELS, TABLE, generate_study, phantom_studies

SIZE = 96
"""In-plane size of the phantom studies here: the method works in mm, so the size only sets the cost."""

MIN_DICE = {"CT-0": 0.95, "CT-1": 0.95, "CT-2": 0.95, "CT-3": 0.90, "CT-4": 0.90}


@functools.lru_cache(maxsize=4)
def study(study_id: int = 947, category: str = "CT-2"):
    hu, _, affine, labels = generate_study(study_id, size=SIZE, involvement=category, return_labels=True)
    return hu, affine, np.isin(labels, LUNG_LABELS)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def world_x(mask: np.ndarray, affine: np.ndarray) -> float:
    """World x (RAS: towards the patient's right) of a mask's centre."""
    return float(affine[0, :3] @ np.argwhere(mask).mean(axis=0) + affine[0, 3])


@pytest.mark.slow
def test_dice_against_the_phantoms_lungs_on_every_study():
    """Every phantom study, the CT-3 and CT-4 ones whose lungs are largely lesion included."""
    failures = []
    for study_id, category in phantom_studies():
        hu, _, affine, labels = generate_study(study_id, size=SIZE, involvement=category, return_labels=True)
        found = segment_lungs(hu, affine)
        score = dice(found > 0, np.isin(labels, LUNG_LABELS))
        if score < MIN_DICE[category]:
            failures.append(f"study {study_id} ({category}): Dice {score:.3f} < {MIN_DICE[category]}")
    assert not failures, failures


def test_right_and_left_in_the_patients_sense():
    hu, affine, truth = study()
    lungs = segment_lungs(hu, affine)
    assert set(np.unique(lungs)) == {0, RIGHT, LEFT}
    assert world_x(lungs == RIGHT, affine) > world_x(lungs == LEFT, affine)
    assert dice(lungs > 0, truth) > 0.95


def test_sides_follow_the_affine_not_the_array():
    """The same study stored mirrored (RAS instead of LAS): the labels mirror with it."""
    hu, affine, _ = study()
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = hu.shape[0] - 1
    mirrored = segment_lungs(hu[::-1].copy(), affine @ flip)
    np.testing.assert_array_equal(mirrored[::-1], segment_lungs(hu, affine))


def add_padding(hu: np.ndarray, value: int) -> np.ndarray:
    """The scanner's padding outside a reconstruction circle that touches the body's sides."""
    x, y = np.ogrid[: hu.shape[0], : hu.shape[1]]
    c = (hu.shape[0] - 1) / 2
    out = hu.copy()
    out[(x - c) ** 2 + (y - c) ** 2 > (0.47 * hu.shape[0]) ** 2] = value
    return out


def add_table_and_arms(hu: np.ndarray, body: np.ndarray) -> np.ndarray:
    """A table under the patient with a hollow core, and two arms beside the chest with air between,
    placed from ``body`` (the patient's voxels, without any table the study has already)."""
    out = hu.copy()
    n = hu.shape[0]
    body_rows = np.nonzero(body.any(axis=(0, 2)))[0]
    bottom = body_rows[0]
    out[:, max(bottom - 6, 0) : max(bottom - 1, 0), :] = 300  # table top
    out[5 : n - 5, max(bottom - 5, 0) : max(bottom - 2, 0), :] = -1000  # its hollow core
    body_cols = np.nonzero(body.any(axis=(1, 2)))[0]
    mid = (body_rows[0] + body_rows[-1]) // 2
    for col in (body_cols[0] - 8, body_cols[-1] + 3):
        out[max(col, 0) : max(col + 5, 0), mid - 10 : mid + 10, :] = 40  # an arm, 2 px of air from the chest
    return out


@pytest.mark.parametrize("padding", [-2048, -3024])
def test_padding_outside_the_reconstruction_circle_is_not_lung(padding):
    hu, affine, _ = study()
    plain = segment_lungs(hu, affine)
    padded = segment_lungs(add_padding(hu, padding), affine)
    assert dice(padded > 0, plain > 0) > 0.99


def test_table_and_arms_are_not_lung():
    hu, affine, truth = study()
    labels = generate_study(947, size=SIZE, involvement="CT-2", return_labels=True)[3]
    body = ~np.isin(labels, (AIR, TABLE))
    lungs = segment_lungs(add_table_and_arms(hu, body), affine)
    assert dice(lungs > 0, truth) > 0.95


def two_box_lungs(bridge: bool) -> np.ndarray:
    """A body with two box-shaped lungs, optionally joined by an air bridge (the anterior junction)."""
    hu = np.full((80, 80, 12), -1000, dtype=np.int16)
    hu[8:72, 10:70, :] = 40
    hu[14:36, 20:60, 1:11] = -850
    hu[44:66, 20:60, 1:11] = -850
    if bridge:
        hu[36:44, 50:56, 1:11] = -850
    return hu


AFFINE_2MM = np.diag([-2.0, 2.0, 8.0, 1.0])


@pytest.mark.parametrize("bridge", [False, True])
def test_joined_lungs_are_split(bridge):
    lungs = segment_lungs(two_box_lungs(bridge), AFFINE_2MM)
    right, left = np.count_nonzero(lungs == RIGHT), np.count_nonzero(lungs == LEFT)
    assert min(right, left) / max(right, left) > 0.8
    # axis 0 runs to the patient's left (LAS), so the right lung holds the low indices
    assert np.argwhere(lungs == RIGHT)[:, 0].max() < np.argwhere(lungs == LEFT)[:, 0].min()


def test_a_lobe_cut_off_by_a_complete_fissure_stays_with_its_lung():
    hu = two_box_lungs(bridge=False)
    hu[14:36, 39, 1:11] = 40  # a fissure across the right lung, one 2 mm pixel thick
    lungs = segment_lungs(hu, AFFINE_2MM)
    right = np.zeros(hu.shape, dtype=bool)
    right[14:36, 20:60, 1:11] = True
    assert np.count_nonzero((lungs == RIGHT) & right) >= 0.95 * np.count_nonzero(right & (hu < -500))
    assert not np.any((lungs == LEFT) & right)


def test_an_empty_volume_has_no_lungs(tmp_path):
    with pytest.raises(LungError, match="no body found"):
        segment_lungs(np.full((40, 40, 10), -1024, dtype=np.int16), AFFINE_2MM, path=tmp_path / "empty.nii.gz")


def test_a_head_ct_has_no_lungs():
    """A skull-like ball of tissue with small air cells (sinuses), no lungs."""
    x, y, z = np.ogrid[:60, :60, :20]
    hu = np.full((60, 60, 20), -1000, dtype=np.int16)
    hu[(x - 30) ** 2 + (y - 30) ** 2 + ((z - 10) * 4) ** 2 < 26**2] = 40
    hu[26:30, 40:44, 8:12] = -1000
    with pytest.raises(LungError, match="no lungs found"):
        segment_lungs(hu, AFFINE_2MM)


def test_a_single_lung_is_a_failed_split():
    hu = two_box_lungs(bridge=False)
    hu[44:66, 20:60, 1:11] = 40
    with pytest.raises(LungError, match="could not be separated"):
        segment_lungs(hu, AFFINE_2MM)


def test_unknown_method():
    hu, affine, _ = study()
    with pytest.raises(ValueError, match="unknown lung method 'atlas'"):
        lung_labels(hu, affine, method="atlas")


@pytest.mark.skipif(find_spec("lungmask") is not None, reason="lungmask is installed here")
def test_lungmask_without_the_package_says_so():
    hu, affine, _ = study()
    with pytest.raises(LungError, match="needs the lungmask package"):
        lung_labels(hu, affine, method="lungmask")
