"""Volumes, involvement and MosMedData categories; confusion matrix and weighted kappa; the files
that ``covidseg predict`` writes about a study's severity."""

from __future__ import annotations

import json
import re
from importlib.util import find_spec

import nibabel as nib
import numpy as np
import pytest

from covidseg.lungs import LEFT, RIGHT
from covidseg.mosmed import CATEGORIES
from covidseg.phantom import LESION_LABELS, LUNG_LABELS, generate_study, phantom_studies
from covidseg.severity import assess, assess_files, category_of, confusion_matrix, format_confusion, voxel_volume_ml, weighted_kappa
from tests.conftest import write_nifti


@pytest.mark.parametrize(
    "percent, category",
    [(0.0, "CT-0"), (1e-9, "CT-1"), (24.99, "CT-1"), (25.0, "CT-2"), (49.99, "CT-2"), (50.0, "CT-3"), (75.0, "CT-3"), (75.01, "CT-4"), (100.0, "CT-4")],
)
def test_category_thresholds(percent, category):
    assert category_of(percent) == category


@pytest.mark.parametrize("bad", [-0.1, 100.5, float("nan")])
def test_category_of_rejects_what_is_not_a_percentage(bad):
    with pytest.raises(ValueError, match="percentage in 0..100"):
        category_of(bad)


def test_the_phantoms_true_labels_land_every_study_in_its_category():
    for study_id, category in phantom_studies():
        _, _, _, labels = generate_study(study_id, size=64, involvement=category, return_labels=True)
        lesion = np.count_nonzero(np.isin(labels, LESION_LABELS))
        lungs = np.count_nonzero(np.isin(labels, LUNG_LABELS))
        assert category_of(100.0 * lesion / lungs) == category, study_id


def test_volumes_come_from_the_affines_determinant():
    """A sheared, rotated grid: the voxel is |det| of the 3x3 part, not the product of the spacings."""
    angle = np.deg2rad(30)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    linear = rotation @ np.array([[0.5, 0.2, 0], [0, 0.5, 0], [0, 0, 2.0]])
    affine = np.eye(4)
    affine[:3, :3] = linear
    assert voxel_volume_ml(affine) == pytest.approx(0.5 * 0.5 * 2.0 / 1000)
    lungs = np.zeros((10, 10, 10), dtype=np.uint8)
    lungs[:5, :, :] = RIGHT  # 500 voxels
    lungs[5:, :8, :] = LEFT  # 400 voxels
    lesion = np.zeros(lungs.shape, dtype=np.int16)
    lesion[:1, :, :] = 1  # 100 voxels, all in the right lung
    lesion[5:7, 8:, :] = 1  # 40 voxels outside the lungs
    result = assess(lesion, lungs, affine)
    voxel = 0.5e-3
    assert result.lung_ml == pytest.approx({"right": 500 * voxel, "left": 400 * voxel, "total": 900 * voxel})
    assert result.lesion_ml == pytest.approx({"right": 100 * voxel, "left": 0.0, "total": 100 * voxel, "all": 140 * voxel})
    assert result.involvement_percent == pytest.approx({"right": 20.0, "left": 0.0, "total": 100 / 9})
    assert result.category == "CT-1"


def test_assess_needs_both_lungs_on_the_same_grid():
    lungs = np.full((4, 4, 4), RIGHT, dtype=np.uint8)
    with pytest.raises(ValueError, match="left lung is empty"):
        assess(np.zeros((4, 4, 4)), lungs, np.eye(4))
    with pytest.raises(ValueError, match="differs from the lung mask"):
        assess(np.zeros((4, 4, 3)), lungs, np.eye(4))


def kappa_by_agreement_weights(matrix: np.ndarray, power: int) -> float:
    """Weighted kappa from agreement weights on proportions, (p_o - p_e) / (1 - p_e), a second
    formulation of Cohen (1968) computed cell by cell."""
    p = matrix / matrix.sum()
    k = len(p)
    rows, cols = p.sum(axis=1), p.sum(axis=0)
    po = pe = 0.0
    for i in range(k):
        for j in range(k):
            v = 1.0 - (abs(i - j) / (k - 1)) ** power
            po += v * p[i, j]
            pe += v * rows[i] * cols[j]
    return (po - pe) / (1.0 - pe)


def test_confusion_matrix_counts_reference_rows_and_predicted_columns():
    matrix = confusion_matrix(["CT-0", "CT-1", "CT-1", "CT-4"], ["CT-0", "CT-2", "CT-1", "CT-3"])
    assert matrix[0, 0] == 1 and matrix[1, 2] == 1 and matrix[1, 1] == 1 and matrix[4, 3] == 1
    assert matrix.sum() == 4
    with pytest.raises(ValueError, match="unknown category 'CT-9'"):
        confusion_matrix(["CT-9"], ["CT-1"])
    with pytest.raises(ValueError, match="2 reference and 1 predicted"):
        confusion_matrix(["CT-1", "CT-1"], ["CT-1"])


@pytest.mark.parametrize("weights, power", [("linear", 1), ("quadratic", 2)])
def test_weighted_kappa_agrees_with_a_second_formulation(weights, power):
    rng = np.random.default_rng(0)
    for _ in range(5):
        matrix = rng.integers(0, 20, size=(5, 5))
        assert weighted_kappa(matrix, weights) == pytest.approx(kappa_by_agreement_weights(matrix, power))
        assert weighted_kappa(matrix.T, weights) == pytest.approx(weighted_kappa(matrix, weights))


def test_weighted_kappa_limits():
    assert weighted_kappa(np.diag([3, 4, 5, 1, 2])) == pytest.approx(1.0)
    # off by one category always: quadratic weights punish it less than a two-category miss
    near, far = np.zeros((5, 5)), np.zeros((5, 5))
    for i in range(4):
        near[i, i + 1] = near[i + 1, i] = 1
    for i in range(3):
        far[i, i + 2] = far[i + 2, i] = 1
    assert weighted_kappa(near) > weighted_kappa(far)
    one_category = np.zeros((5, 5))
    one_category[1, 1] = 10
    assert np.isnan(weighted_kappa(one_category))
    assert np.isnan(weighted_kappa(np.zeros((5, 5))))
    with pytest.raises(ValueError, match="unknown weights 'cubic'"):
        weighted_kappa(near, "cubic")
    assert "undefined" in format_confusion(one_category)
    assert "quadratic weighted kappa 1.000 over 15 studies" in format_confusion(np.diag([3, 4, 5, 1, 2]))


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory):
    """A CT-2 phantom study and its true lesion mask, stored in LAS and mirrored in RAS."""
    folder = tmp_path_factory.mktemp("severity")
    hu, _, affine, labels = generate_study(947, size=96, involvement="CT-2", return_labels=True)
    lesion = np.isin(labels, LESION_LABELS).astype(np.int16)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = hu.shape[0] - 1
    files = {
        "las": (write_nifti(folder / "las.nii.gz", hu, affine), write_nifti(folder / "las_mask.nii.gz", lesion, affine)),
        "ras": (
            write_nifti(folder / "ras.nii.gz", hu[::-1].copy(), affine @ flip),
            write_nifti(folder / "ras_mask.nii.gz", lesion[::-1].copy(), affine @ flip),
        ),
    }
    return folder, files


def test_assess_files_writes_the_lung_mask_on_the_inputs_grid_and_the_numbers(phantom_files):
    folder, files = phantom_files
    results = {}
    for name, (study, mask) in files.items():
        lungs_out, json_out = folder / f"{name}_lungs.nii.gz", folder / f"{name}.json"
        results[name] = assess_files(study, mask, lungs_out=lungs_out, json_out=json_out)
        written, source = nib.load(lungs_out), nib.load(study)
        assert written.shape == source.shape
        np.testing.assert_array_equal(written.affine, source.affine)
        np.testing.assert_array_equal(written.header.get_qform(), source.header.get_qform())
        lungs = np.asarray(written.dataobj)
        assert set(np.unique(lungs)) == {0, RIGHT, LEFT}
        # the right lung lies towards world +x (RAS), however the file is stored
        centre = {label: written.affine[0, :3] @ np.argwhere(lungs == label).mean(axis=0) for label in (RIGHT, LEFT)}
        assert centre[RIGHT] > centre[LEFT]
        record = json.loads(json_out.read_text())
        assert record["category"] == results[name].category == "CT-2"
        assert record["involvement_percent"] == pytest.approx(results[name].involvement_percent)
    las, ras = results["las"], results["ras"]
    assert las.category == ras.category
    for field in ("lung_ml", "lesion_ml", "involvement_percent"):
        assert getattr(las, field) == pytest.approx(getattr(ras, field)), field


def test_predict_reports_severity_and_writes_lungs_and_json(phantom_files, untrained_run, tmp_path, capsys):
    from covidseg.cli import main

    _, files = phantom_files
    study = files["ras"][0]
    mask, lungs_out, json_out = tmp_path / "mask.nii.gz", tmp_path / "lungs.nii.gz", tmp_path / "severity.json"
    args = ["predict", "--run", str(untrained_run), str(study), str(mask), "--device", "cpu"]
    assert main([*args, "--lungs-out", str(lungs_out), "--json", str(json_out)]) == 0
    printed = capsys.readouterr().out
    record = json.loads(json_out.read_text())
    assert f"category {record['category']}" in printed and "right lung" in printed and "left lung" in printed
    expected = assess_files(study, mask)
    assert record["lung_ml"] == pytest.approx(expected.lung_ml)
    assert record["lesion_ml"]["all"] == pytest.approx(float(re.search(r"lesion volume (\d+\.\d) mL", printed).group(1)), abs=0.05)
    assert nib.load(lungs_out).shape == nib.load(study).shape


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lungs", "lungmask"], "needs the lungmask package"),
        (["--json", "STUDY"], "names the study or the mask"),
        (["--lungs-out", "lungs.txt"], "must end in .nii.gz or .nii"),
    ],
)
def test_predict_checks_severity_options_before_predicting(extra, message, phantom_files, untrained_run, tmp_path, capsys):
    from covidseg.cli import main

    _, files = phantom_files
    study = files["las"][0]
    if extra[0] == "--lungs" and find_spec("lungmask") is not None:
        pytest.skip("lungmask is installed here")
    extra = [str(study) if e == "STUDY" else str(tmp_path / e) if e.endswith(".txt") else e for e in extra]
    mask = tmp_path / "mask.nii.gz"
    assert main(["predict", "--run", str(untrained_run), str(study), str(mask), "--device", "cpu", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not mask.exists(), "nothing is predicted when an option is bad"


def test_every_category_is_named():
    assert tuple(category_of(p) for p in (0, 10, 30, 60, 90)) == CATEGORIES
