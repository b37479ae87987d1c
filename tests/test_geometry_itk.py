"""Geometry as real clients read it: a predicted mask lies exactly on its study for ITK and nibabel.

SimpleITK wraps ITK's NIfTI reader, the one behind ITK-SNAP and 3D Slicer. It prefers the qform
unless the sform code is 1 (scanner anatomical); nibabel prefers the sform whenever its code is
set. A mask is only safe if it carries its study's qform, sform and both codes exactly, so that
each reader places it where it places the study.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from covidseg import prediction
from covidseg.cli import main
from covidseg.config import get_preset
from covidseg.errors import DataError
from covidseg.nifti import load_volume
from covidseg.prediction import predict_file

from conftest import ThresholdModel, synthetic_ct, write_lesion_everywhere_run

sitk = pytest.importorskip("SimpleITK", reason="SimpleITK is a test dependency (pip install covidseg[test])")


def _affine(codes: str, spacing=(0.7, 0.8, 5.0), origin=(-120.0, -100.0, 30.0), tilt_deg: float = 0.0) -> np.ndarray:
    """A voxel-to-world (RAS+) affine whose array axes point to ``codes`` (e.g. ``"LPI"``)."""
    axes = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    rotation = np.zeros((3, 3))
    for column, code in enumerate(codes):
        row, sign = axes[code]
        rotation[row, column] = sign
    t = np.deg2rad(tilt_deg)  # a rotation about the world's x axis, e.g. gantry-like tilt
    tilt = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    affine = np.eye(4)
    affine[:3, :3] = tilt @ rotation @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


# (name, qform or None, qform code, sform or None, sform code)
CASES = [
    ("RAS", _affine("RAS"), 1, _affine("RAS"), 1),
    ("LAS", _affine("LAS"), 1, _affine("LAS"), 1),
    ("LPI", _affine("LPI"), 1, _affine("LPI"), 1),
    ("qform-differs-sform-aligned", _affine("LAS"), 1, _affine("LAS", origin=(-120.0, -100.0, 42.0)), 2),
    ("qform-differs-sform-scanner", _affine("RAS", tilt_deg=5), 1, _affine("RAS", origin=(-110, -100, 30)), 1),
    ("qform-differs-codes-2-and-4", _affine("LPI"), 2, _affine("LPI", tilt_deg=-7), 4),
    ("sform-only", None, 0, _affine("LPI", tilt_deg=3), 1),
    ("qform-only", _affine("LAS", tilt_deg=4), 1, None, 0),
    ("neither-code", _affine("LAS"), 0, _affine("LAS"), 0),
]


def _write_study(path, hu, qform, qcode, sform, scode):
    image = nib.Nifti1Image(hu, None)
    image.header.set_data_shape(hu.shape)
    image.header.set_qform(qform, code=qcode)
    image.header.set_sform(sform, code=scode)
    if qform is None:  # pixdim still carries the voxel size, as the NIfTI standard requires
        image.header.set_zooms(tuple(np.sqrt((sform[:3, :3] ** 2).sum(axis=0))))
    nib.save(image, path)
    return path


def _itk_geometry(path):
    image = sitk.ReadImage(str(path))
    return image.GetOrigin(), image.GetSpacing(), image.GetDirection(), image.GetSize()


GEOMETRY_FIELDS = ("pixdim", "qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d",
                   "qoffset_x", "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z")


@pytest.fixture
def threshold_model(monkeypatch):
    config = get_preset("quick").replace(image_size=32)
    monkeypatch.setattr(prediction, "load_trained_model", lambda run_dir, device="cpu": (ThresholdModel(-600.0).eval(), config))


@pytest.mark.parametrize("name, qform, qcode, sform, scode", CASES, ids=[c[0] for c in CASES])
def test_mask_lies_on_its_study_for_itk_and_nibabel(tmp_path, threshold_model, name, qform, qcode, sform, scode):
    hu, _ = synthetic_ct(shape=(32, 32, 6), seed=3)
    study = _write_study(tmp_path / "ct.nii.gz", hu, qform, qcode, sform, scode)
    before = study.read_bytes()

    volume_ml = predict_file(tmp_path / "run", study, tmp_path / "mask.nii.gz", batch_size=4, device="cpu")

    assert study.read_bytes() == before
    origin, spacing, direction, size = _itk_geometry(study)
    m_origin, m_spacing, m_direction, m_size = _itk_geometry(tmp_path / "mask.nii.gz")
    assert m_size == size
    np.testing.assert_array_equal(m_origin, origin)
    np.testing.assert_array_equal(m_spacing, spacing)
    np.testing.assert_array_equal(m_direction, direction)

    written, source = nib.load(tmp_path / "mask.nii.gz"), nib.load(study)
    for field in GEOMETRY_FIELDS:
        np.testing.assert_array_equal(written.header[field], source.header[field], err_msg=field)
    np.testing.assert_array_equal(written.affine, source.affine)
    np.testing.assert_array_equal(written.header.get_qform(), source.header.get_qform())
    np.testing.assert_array_equal(written.header.get_sform(), source.header.get_sform())
    expected = (hu > -600).astype(np.int16)  # in the file's own orientation
    assert np.array_equal(np.asarray(written.dataobj), expected)

    # the volume uses the voxel ITK measures: spacing product = |det| of nibabel's best affine
    itk_voxel = float(np.prod(spacing))
    assert load_volume(study).voxel_volume_mm3 == pytest.approx(itk_voxel, rel=1e-6)
    assert volume_ml == pytest.approx(expected.sum() * itk_voxel / 1000.0, rel=1e-6)


def test_header_whose_sform_and_pixdim_disagree_is_refused(tmp_path):
    """ITK would measure 1 mm voxels (pixdim), nibabel 0.7 x 0.7 x 8 mm (sform): refuse, do not guess."""
    hu, _ = synthetic_ct(shape=(16, 16, 4))
    image = nib.Nifti1Image(hu, None)
    image.header.set_sform(_affine("LAS", spacing=(0.7, 0.7, 8.0)), code=1)
    image.header.set_qform(None, code=0)
    image.header["pixdim"][1:4] = 1.0
    nib.save(image, tmp_path / "ct.nii.gz")
    with pytest.raises(DataError, match=r"ct\.nii\.gz: header is ambiguous: the sform's voxel size 0\.7 x 0\.7 x 8 mm "
                                        r"differs from pixdim 1 x 1 x 1 mm"):
        load_volume(tmp_path / "ct.nii.gz")


def test_lesion_volume_of_a_sheared_grid_uses_the_determinant(tmp_path, threshold_model):
    """A sheared grid (e.g. an uncorrected gantry tilt): the voxel is |det A|, not the product of
    the column norms, which overstates it."""
    hu, _ = synthetic_ct(shape=(32, 32, 6), seed=3)
    sform = _affine("LAS")
    sform[:3, 2] += (0.0, 5.0 * np.tan(np.deg2rad(20)), 0.0)  # slices shifted along y by 20 degrees
    study = _write_study(tmp_path / "ct.nii.gz", hu, None, 0, sform, 1)
    volume_ml = predict_file(tmp_path / "run", study, tmp_path / "mask.nii.gz", batch_size=4, device="cpu")
    stored = nib.load(study).header.get_sform()  # float32 in the file
    determinant = abs(np.linalg.det(stored[:3, :3]))
    norms = np.prod(np.sqrt((stored[:3, :3] ** 2).sum(axis=0)))
    assert determinant == pytest.approx(0.7 * 0.8 * 5.0) and norms > 1.06 * determinant
    assert volume_ml == pytest.approx((hu > -600).sum() * determinant / 1000.0, rel=1e-9)
    written, source = nib.load(tmp_path / "mask.nii.gz"), nib.load(study)
    for field in GEOMETRY_FIELDS:
        np.testing.assert_array_equal(written.header[field], source.header[field], err_msg=field)


@pytest.mark.parametrize("name", ["LPI", "qform-differs-sform-aligned"])
def test_covidseg_predict_writes_the_mask_on_the_studys_geometry(name, tmp_path, capsys):
    """Through the command line and a real saved run (a U-Net whose head says lesion everywhere)."""
    _, qform, qcode, sform, scode = next(c for c in CASES if c[0] == name)
    hu, _ = synthetic_ct(shape=(32, 32, 4), seed=4)
    study = _write_study(tmp_path / "ct.nii.gz", hu, qform, qcode, sform, scode)
    run = write_lesion_everywhere_run(tmp_path / "run")
    before = study.read_bytes()

    code = main(["predict", "--run", str(run), str(study), str(tmp_path / "mask.nii.gz"), "--device", "cpu"])

    out, err = capsys.readouterr()
    assert code == 0, err
    voxel = float(np.prod(_itk_geometry(study)[1]))
    assert out == f"lesion volume {hu.size * voxel / 1000:.1f} mL; mask written to {tmp_path / 'mask.nii.gz'}\n"
    assert study.read_bytes() == before
    assert _itk_geometry(tmp_path / "mask.nii.gz") == _itk_geometry(study)
    written, source = nib.load(tmp_path / "mask.nii.gz"), nib.load(study)
    for field in GEOMETRY_FIELDS:
        np.testing.assert_array_equal(written.header[field], source.header[field], err_msg=field)
    assert np.asarray(written.dataobj).min() == 1
