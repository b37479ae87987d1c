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
