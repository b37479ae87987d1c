import itertools

import nibabel as nib
import numpy as np
import pytest

from covidseg.errors import DataError
from covidseg.nifti import WORKING_ORIENTATION, check_same_grid, load_volume, orientation_of, save_volume

from conftest import LAS_AFFINE, write_nifti


def test_las_file_is_loaded_unchanged(tmp_path):
    array = np.arange(4 * 5 * 3, dtype=np.int16).reshape(4, 5, 3)
    path = write_nifti(tmp_path / "a.nii.gz", array)
    volume = load_volume(path)
    assert orientation_of(volume.affine) == WORKING_ORIENTATION
    np.testing.assert_array_equal(volume.array, array)
    np.testing.assert_allclose(volume.affine, LAS_AFFINE)
    assert volume.spacing == pytest.approx((0.75, 0.75, 8.0))


def test_other_orientation_is_reoriented_by_the_affine(tmp_path):
    """An RAS file with the same world geometry as an LAS one loads to the same array."""
    array = np.random.default_rng(0).integers(-1000, 1000, size=(4, 5, 3)).astype(np.int16)
    las = write_nifti(tmp_path / "las.nii.gz", array)
    flipped = array[::-1]  # axis 0 now runs to the right
    ras_affine = LAS_AFFINE.copy()
    ras_affine[0, 0] = 0.75
    ras_affine[0, 3] = LAS_AFFINE[0, 3] - 0.75 * 3
    ras = write_nifti(tmp_path / "ras.nii.gz", flipped, ras_affine)
    assert orientation_of(nib.load(ras).affine) == ("R", "A", "S")
    a, b = load_volume(las), load_volume(ras)
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.affine, b.affine)


def test_axial_axis_moved_last(tmp_path):
    """A file stored with the axial axis first still yields axial slices along axis 2."""
    array = np.random.default_rng(1).integers(0, 2, size=(3, 4, 5)).astype(np.int16)  # (S, L, A)
    affine = np.array([[0, -0.75, 0, 0], [0, 0, 0.75, 0], [8.0, 0, 0, 0], [0, 0, 0, 1.0]])
    volume = load_volume(write_nifti(tmp_path / "sla.nii.gz", array, affine))
    assert volume.array.shape == (4, 5, 3)
    np.testing.assert_array_equal(volume.array[:, :, 1], array[1])


@pytest.mark.parametrize("axes", list(itertools.permutations(range(3))))
@pytest.mark.parametrize("signs", list(itertools.product((1, -1), repeat=3)))
def test_every_axis_order_loads_as_las_and_saves_back_as_it_was(axes, signs, tmp_path):
    """All 48 orientations: each voxel keeps its world position, and save_volume restores the file."""
    array = np.random.default_rng(2).integers(-1000, 1000, size=(4, 5, 3)).astype(np.int16)
    affine = np.diag([0.0, 0.0, 0.0, 1.0])
    for axis, (world, sign, size) in enumerate(zip(axes, signs, (0.75, 0.8, 8.0))):
        affine[world, axis] = sign * size  # array axis ``axis`` runs along world axis ``world``
    affine[:3, 3] = (12.5, -30.25, 7.0)
    source = write_nifti(tmp_path / "source.nii.gz", array, affine)
    volume = load_volume(source)
    assert orientation_of(volume.affine) == WORKING_ORIENTATION
    assert sorted(volume.spacing) == pytest.approx([0.75, 0.8, 8.0])
    voxels = np.indices(array.shape).reshape(3, -1).T
    moved = np.rint(nib.affines.apply_affine(np.linalg.inv(volume.affine), nib.affines.apply_affine(affine, voxels)))
    np.testing.assert_array_equal(volume.array[tuple(moved.astype(int).T)], array.reshape(-1))
    written = nib.load(save_volume(volume.array, volume, tmp_path / "back.nii.gz"))
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), array)
    np.testing.assert_array_equal(written.affine, nib.load(source).affine)


def test_save_volume_keeps_file_geometry(tmp_path):
    array = np.zeros((4, 5, 3), dtype=np.int16)
    ras_affine = np.diag([0.7, 0.7, 8.0, 1.0])
    source = load_volume(write_nifti(tmp_path / "ras.nii.gz", array, ras_affine))
    mask = np.zeros_like(source.array)
    mask[0, 1, 2] = 1  # working orientation: the most patient-right voxel in the file is now index 3
    out = save_volume(mask, source, tmp_path / "out.nii.gz", description="test")
    written = nib.load(out)
    np.testing.assert_allclose(written.affine, ras_affine)
    on_disk = np.asanyarray(written.dataobj)
    assert on_disk.dtype == np.int16
    assert on_disk[3, 1, 2] == 1 and on_disk.sum() == 1
    np.testing.assert_array_equal(load_volume(out).array, mask)


def test_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.nii.gz"
    with pytest.raises(DataError, match="missing.nii.gz: file not found"):
        load_volume(missing)
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"this is not a NIfTI file at all")
    with pytest.raises(DataError, match="junk.nii.gz: not a readable NIfTI"):
        load_volume(junk)
    good = write_nifti(tmp_path / "good.nii.gz", np.zeros((64, 64, 16), dtype=np.int16) + 7)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated.nii.gz"):
        load_volume(truncated)
    four_d = write_nifti(tmp_path / "4d.nii.gz", np.zeros((4, 4, 3, 2), dtype=np.int16))
    with pytest.raises(DataError, match="4d.nii.gz: expected a 3D volume, found 4D"):
        load_volume(four_d)
    nan = np.zeros((4, 4, 3), dtype=np.float32)
    nan[1, 1, 1] = np.nan
    with pytest.raises(DataError, match="nan.nii.gz: 1 voxels are NaN"):
        load_volume(write_nifti(tmp_path / "nan.nii.gz", nan))


def test_check_same_grid(tmp_path):
    study = load_volume(write_nifti(tmp_path / "s.nii.gz", np.zeros((4, 5, 3), dtype=np.int16)))
    same = load_volume(write_nifti(tmp_path / "m.nii.gz", np.zeros((4, 5, 3), dtype=np.int16)))
    check_same_grid(study, same)
    other_shape = load_volume(write_nifti(tmp_path / "shape.nii.gz", np.zeros((4, 5, 4), dtype=np.int16)))
    with pytest.raises(DataError, match="shape.nii.gz: mask shape"):
        check_same_grid(study, other_shape)
    shifted = LAS_AFFINE.copy()
    shifted[2, 3] += 4.0
    moved = load_volume(write_nifti(tmp_path / "moved.nii.gz", np.zeros((4, 5, 3), dtype=np.int16), shifted))
    with pytest.raises(DataError, match="moved.nii.gz: mask affine differs"):
        check_same_grid(study, moved)


def test_real_mask_matches_nibabel(real_masks):
    path = real_masks / "study_0255_mask.nii.gz"
    image = nib.load(path)
    volume = load_volume(path)
    np.testing.assert_array_equal(volume.array, np.asanyarray(image.dataobj))
    np.testing.assert_array_equal(volume.affine, image.affine)
    assert orientation_of(image.affine) == ("L", "A", "S")


def test_a_gap_just_over_the_tolerance_is_shown_exactly(tmp_path):
    """Rounded to 3 digits, 0.0125 mm would read as within the 0.01 mm tolerance's neighbourhood."""
    study = load_volume(write_nifti(tmp_path / "s.nii.gz", np.zeros((4, 5, 3), dtype=np.int16)))
    shifted = LAS_AFFINE.copy()
    shifted[0, 3] += 0.0125  # exactly representable in float32 offsets near 190
    moved = load_volume(write_nifti(tmp_path / "moved.nii.gz", np.zeros((4, 5, 3), dtype=np.int16), shifted))
    gap = float(np.abs(moved.affine - study.affine).max())
    with pytest.raises(DataError) as raised:
        check_same_grid(study, moved)
    assert str(raised.value) == f"{tmp_path / 'moved.nii.gz'}: mask affine differs from its study's by up to {gap!r} mm (at most 0.01 mm allowed)"


def test_nifti2_study_gets_a_nifti2_mask_with_its_float64_geometry(tmp_path):
    affine = LAS_AFFINE.copy()
    affine[:3, 3] += (0.123456789012, -0.987654321098, 0.5)  # needs float64: NIfTI-1 would round it
    image = nib.Nifti2Image(np.zeros((4, 5, 3), dtype=np.int16), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=2)
    nib.save(image, tmp_path / "ct.nii")
    study = load_volume(tmp_path / "ct.nii")
    save_volume(np.ones((4, 5, 3), dtype=np.int16), study, tmp_path / "mask.nii")
    written = nib.load(tmp_path / "mask.nii")
    assert isinstance(written, nib.Nifti2Image)
    for field in ("pixdim", "qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d",
                  "qoffset_x", "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z"):
        np.testing.assert_array_equal(written.header[field], study.header[field], err_msg=field)
    np.testing.assert_array_equal(written.affine, nib.load(tmp_path / "ct.nii").affine)
    assert written.header.get_sform()[0, 3] == affine[0, 3]
