"""The phantom against real CT: lesion shapes with the real masks' statistics (package data), the
anatomy and the acquisition details that real scans have (table, arms, reconstruction circle with
padding, correlated noise), and a prediction that the padding does not change."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from covidseg.cli import main
from covidseg.phantom import AIR, BONE, LUNG_LABELS, TABLE, generate_study, phantom_studies
from covidseg.phantom.acquisition import outside_circle
from covidseg.phantom.calibration import TARGETS, lesion_shape_statistics, real_mask_statistics, within_targets
from covidseg.phantom.constants import HU_RANGE, NOISE_STD_HU, PADDING_VALUES

from conftest import TINY_TRAIN_FLAGS, write_nifti

SAMPLE_512 = (255, 262, 268, 274, 281, 293)
"""Annotated studies whose lesion shapes are measured at 512 px: small enough for CI."""


def test_real_statistics_are_package_data_and_inside_the_targets():
    real = real_mask_statistics()
    assert real["studies"] == 50
    assert real["pieces_per_lesion_slice"]["median"] == 7 and real["pieces_per_study"]["median"] == 60
    assert all(ok for _, _, ok in within_targets(real).values()), within_targets(real)


def test_statistics_count_face_connected_pieces():
    mask = np.zeros((8, 8, 3), dtype=np.int16)
    mask[1, 1, 0] = mask[2, 2, 0] = 1  # diagonal neighbours: two pieces in 2D and in 3D
    mask[5:7, 5:7, 0] = mask[5:7, 5:7, 1] = 1  # one 3D piece over two slices
    stats = lesion_shape_statistics([mask])
    assert stats["pieces_per_lesion_slice"]["median"] == 2.0  # slices 0 (3 pieces) and 1 (1 piece)
    assert stats["pieces_per_study"]["median"] == 3.0
    assert stats["share_of_small_pieces"] == 1.0
    assert stats["lesion_slice_share_mean"] == pytest.approx(2 / 3)


@pytest.mark.slow
def test_lesion_shapes_match_the_real_masks_at_512_px():
    """Fragmented multifocal lesions: the real masks' pieces per slice and per study, and sizes."""
    masks = [generate_study(study_id, size=512)[1] for study_id in SAMPLE_512]
    checks = within_targets(lesion_shape_statistics(masks))
    for name in ("pieces_per_lesion_slice_median", "pieces_per_study_median", "share_of_small_pieces"):
        value, (low, high), ok = checks[name]
        assert ok, f"{name} = {value:.3f}, target {low}..{high}"
    assert set(checks) == set(TARGETS)


def test_padding_outside_the_reconstruction_circle_in_some_studies():
    found = set()
    for study_id, category in phantom_studies():
        hu = generate_study(study_id, size=32, involvement=category)[0]
        outside = np.broadcast_to(outside_circle(32), hu.shape)
        values = np.unique(hu[outside])
        assert hu[~outside].min() >= HU_RANGE[0]  # inside the circle: reconstructed HU
        if len(values) == 1 and values[0] in PADDING_VALUES:
            found.add(int(values[0]))
        else:
            found.add(None)
            assert values.min() >= HU_RANGE[0]
    assert found == {*PADDING_VALUES, None}


def test_predict_gives_the_same_mask_with_or_without_padding(tiny50, tmp_path, one_thread):
    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny50), "--out", str(run), *TINY_TRAIN_FLAGS, "--epochs", "1"]) == 0
    hu, _, affine = generate_study(255, size=48, n_slices=8)
    outside = np.broadcast_to(outside_circle(48), hu.shape)
    assert (hu[outside] == -2048).all()  # study 255 is padded
    air = np.where(outside, HU_RANGE[0], hu).astype(np.int16)  # the same scan stored without padding
    masks = []
    for name, volume in (("padded", hu), ("air", air)):
        study = write_nifti(tmp_path / f"{name}.nii.gz", volume, affine)
        assert main(["predict", "--run", str(run), str(study), str(tmp_path / f"{name}_mask.nii.gz"), "--device", "cpu"]) == 0
        masks.append(np.asarray(nib.load(tmp_path / f"{name}_mask.nii.gz").dataobj))
    np.testing.assert_array_equal(masks[0], masks[1])


def test_table_under_the_back_and_arms_in_some_studies():
    arms = []
    for study_id in (255, 256, 257, 258, 259, 260, 261, 262):
        _, _, _, labels = generate_study(study_id, size=64, n_slices=10, return_labels=True)
        body = ~np.isin(labels, (AIR, TABLE))
        i_body = np.nonzero(body.any(axis=(1, 2)))[0]
        mid = int(np.median(i_body))
        table_j = np.nonzero((labels[mid] == TABLE).any(axis=1))[0]
        body_j = np.nonzero(body[mid].any(axis=1))[0]
        assert table_j.size and table_j.max() < body_j.min(), study_id  # behind the back: low axis-1 indices
        # arms: separate bony pieces left and right of the chest
        centre = int(np.median(np.nonzero(labels[:, :, 5] == BONE)[0]))
        row = body[:, :, 5].any(axis=1)
        gaps = np.nonzero(~row[i_body.min() : i_body.max() + 1])[0]
        arms.append(gaps.size > 0 and (labels[: centre - 20, :, 5] == BONE).any())
    assert any(arms) and not all(arms)


def test_noise_is_correlated_with_a_realistic_amplitude():
    """Per-voxel SD in the drawn range (HU), and neighbouring pixels correlated at 512 px."""
    study = dict(study_id=300, size=512, n_slices=8, return_labels=True)
    hu, _, _, labels = generate_study(**study)
    clean = generate_study(**study, noise=False)[0]
    noise = hu.astype(np.float32) - clean
    soft = ~np.isin(labels, (AIR, TABLE, *LUNG_LABELS)) & (hu > -900)
    assert NOISE_STD_HU[0] - 2 <= noise[soft].std() <= NOISE_STD_HU[1] + 2
    centre = noise[200:312, 200:312, :]
    r = np.corrcoef(centre[:-1].ravel(), centre[1:].ravel())[0, 1]
    assert r > 0.2
