import numpy as np
import pytest

from covidseg.errors import DataError
from covidseg.preprocessing import HU_CLIP, HU_SCALE, NotHounsfieldWarning, check_binary_mask, check_hu_range, preprocess_hu

from conftest import synthetic_ct


def test_clip_and_scale_golden_values():
    hu = np.array([-3024, -1000, -500, 0, 40, 1000, 3071], dtype=np.int16)
    out = preprocess_hu(hu)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [-1.0, -1.0, -0.5, 0.0, 0.04, 1.0, 1.0], atol=1e-7)
    assert HU_CLIP == (-1000.0, 1000.0) and HU_SCALE == 1000.0
    assert hu[0] == -3024, "the input is not modified"


def test_hu_range_accepts_ct_and_refuses_scaled_volumes():
    hu, _ = synthetic_ct((32, 32, 4))
    check_hu_range(hu)
    for scaled, name in ((np.random.default_rng(0).uniform(0, 255, (32, 32, 4)), "0..255"), (np.random.default_rng(0).uniform(0, 1, (32, 32, 4)), "0..1")):
        with pytest.raises(DataError, match="scan.nii.gz: intensities span .* not Hounsfield units"):
            check_hu_range(scaled, "scan.nii.gz")
        with pytest.warns(NotHounsfieldWarning):
            check_hu_range(scaled, "scan.nii.gz", strict=False)
    already_preprocessed = preprocess_hu(hu)
    with pytest.raises(DataError):
        check_hu_range(already_preprocessed)


def test_binary_mask():
    assert check_binary_mask(np.array([0, 1, 1], dtype=np.int16)).dtype == np.uint8
    with pytest.raises(DataError, match="m.nii.gz: mask values must be 0 or 1, found 2, 255"):
        check_binary_mask(np.array([0, 1, 2, 255]), "m.nii.gz")


def _circle_outside(shape) -> np.ndarray:
    x, y = np.ogrid[: shape[0], : shape[1]]
    r = min(shape[:2]) / 2
    return np.broadcast_to((((x - (shape[0] - 1) / 2) ** 2 + (y - (shape[1] - 1) / 2) ** 2) > r**2)[:, :, None], shape)


@pytest.mark.parametrize("padding", [-3024, -2048, -2000, -1024, -32768])
def test_hu_range_accepts_padding_outside_the_reconstruction_circle(padding):
    hu, _ = synthetic_ct((48, 48, 4))
    hu[_circle_outside(hu.shape)] = padding
    check_hu_range(hu, "scan.nii.gz")


def test_hu_range_accepts_padding_with_stray_values_below_it():
    """The padding need not be the minimum: a resampled edge or a stray voxel can lie below it."""
    hu, _ = synthetic_ct((48, 48, 4))
    hu[_circle_outside(hu.shape)] = -2048
    hu[0, 0, :] = -3000
    hu[2, 0, 0] = -32768
    check_hu_range(hu, "scan.nii.gz")


def test_hu_range_accepts_a_volume_cropped_to_the_body():
    """No outside air: the lungs (-850 HU) are the air peak."""
    hu, _ = synthetic_ct((48, 48, 4))
    check_hu_range(hu[4:-4, 4:-4], "scan.nii.gz")


@pytest.mark.parametrize(
    "transform, problem",
    [
        (lambda hu: hu - 1024, r"its air peaks at -20\d\d, not near -1000"),
        (lambda hu: hu.astype(np.int32) + 1024, r"no air"),
        (lambda hu: hu * 2, r"its air peaks at -\d+, not near -1000"),
        (lambda hu: hu // 2, r"its air peaks at -\d+, not near -1000"),
        (lambda hu: np.where(_circle_outside(hu.shape), -3024, hu - 1024), r"its air peaks at -1\d\d\d"),
        (lambda hu: np.where(hu > -500, -1000, hu), r"no soft tissue \(0% within -200..200, water is 0\)"),
    ],
    ids=["minus-1024", "plus-1024", "doubled", "halved", "minus-1024-padded", "air-only"],
)
def test_hu_range_refuses_shifted_and_rescaled_volumes(transform, problem):
    hu, _ = synthetic_ct((48, 48, 4))
    with pytest.raises(DataError, match=r"^scan\.nii\.gz: intensities span -?\d.* not Hounsfield units: " + problem):
        check_hu_range(transform(hu), "scan.nii.gz")


@pytest.mark.parametrize(
    "values, shown",
    [
        (np.array([0, 1.0000012], dtype=np.float32), "1.0000012"),
        (np.array([0, 0.5, 1], dtype=np.float64), "0.5"),
        (np.array([0, 1, 2, 3, 4, 5, 6, 7], dtype=np.int16), "2, 3, 4, 5, 6, ... (6 values)"),
        (np.array([-1, 0, 1], dtype=np.int8), "-1"),
        (np.array([0, 1e-5], dtype=np.float32), "0.00001"),
    ],
)
def test_binary_mask_names_the_real_values(values, shown):
    with pytest.raises(DataError) as raised:
        check_binary_mask(values, "m.nii.gz")
    assert str(raised.value) == f"m.nii.gz: mask values must be 0 or 1, found {shown}"


def test_binary_mask_accepts_1_within_float_precision():
    scaled = np.array([0, 255, 255]) * np.float64(np.float32(1 / 255))  # as nibabel applies a float32 scl_slope
    assert scaled.max() != 1
    for mask in (scaled, np.array([0, 1.0000001, -1e-8], dtype=np.float32)):
        out = check_binary_mask(mask)
        assert out.dtype == np.uint8 and out.tolist() in ([0, 1, 1], [0, 1, 0])


def test_hu_stored_unsigned_with_a_rescale_intercept_is_accepted(tmp_path):
    """DICOM converters often store uint16 with scl_inter -1024: nibabel applies it, giving HU."""
    import nibabel as nib

    from covidseg.nifti import load_volume

    hu, _ = synthetic_ct((48, 48, 4))
    image = nib.Nifti1Image((hu.astype(np.int32) + 1024).astype(np.uint16), np.diag([-0.7, 0.7, 8.0, 1.0]))
    image.header.set_slope_inter(1.0, -1024.0)
    nib.save(image, tmp_path / "ct.nii.gz")
    volume = load_volume(tmp_path / "ct.nii.gz")
    check_hu_range(volume.array, volume.path)
    assert np.array_equal(volume.array, hu)
    raw = nib.Nifti1Image((hu.astype(np.int32) + 1024).astype(np.uint16), np.diag([-0.7, 0.7, 8.0, 1.0]))
    nib.save(raw, tmp_path / "raw.nii.gz")  # the same numbers without the intercept: refused
    with pytest.raises(DataError, match=r"raw\.nii\.gz: .* not Hounsfield units: no air"):
        check_hu_range(load_volume(tmp_path / "raw.nii.gz").array, tmp_path / "raw.nii.gz")


def test_metrics_apply_the_same_rule_to_ground_truth():
    import torch

    from covidseg.metrics import confusion_counts

    pred = np.array([1, 0, 1, 0], dtype=np.float32)
    with pytest.raises(ValueError, match=r"^ground truth must hold only 0 and 1, found 0\.75, 1\.0000012 \(is it a probability map\?\)$"):
        confusion_counts(pred, np.array([0, 0.75, 1.0000012, 1], dtype=np.float32))
    scaled = np.array([255, 0, 255, 0]) * np.float64(np.float32(1 / 255))  # 1 to float precision
    assert tuple(int(c) for c in confusion_counts(pred, scaled)[:3]) == (2, 0, 0)
    assert tuple(int(c) for c in confusion_counts(torch.from_numpy(pred), torch.tensor([1, 0, 0, 0]))[:3]) == (1, 1, 0)
