import numpy as np
import pytest
import torch

from covidseg.dataset import SliceDataset
from covidseg.errors import DataError
from covidseg.mosmed import annotated_studies, mask_path
from covidseg.nifti import load_volume
from covidseg.preprocessing import from_slices, preprocess_hu, resize_slices, to_slices

from conftest import synthetic_ct, write_nifti


def test_items_are_axial_slices_in_study_order(tiny_dataset):
    studies = annotated_studies(tiny_dataset, [255, 256])
    dataset = SliceDataset(studies)
    assert len(dataset) == 12 and dataset.slice_counts == {255: 6, 256: 6}
    image, mask = dataset[8]  # study 256, slice 2
    volume = load_volume(studies[1].image)
    truth = load_volume(studies[1].mask)
    assert image.shape == mask.shape == (1, 32, 32) and image.dtype == mask.dtype == torch.float32
    np.testing.assert_allclose(image[0].numpy(), preprocess_hu(volume.array)[:, :, 2])
    np.testing.assert_array_equal(mask[0].numpy(), truth.array[:, :, 2])
    assert dataset.locate(-1) == (1, 5)
    with pytest.raises(IndexError):
        dataset[12]


def test_one_copy_of_the_preprocessed_volumes(tiny_dataset):
    dataset = SliceDataset(annotated_studies(tiny_dataset, [255]))
    entry = dataset.studies[0]
    assert entry.images.flags["C_CONTIGUOUS"] and entry.images.dtype == np.float32 and entry.masks.dtype == np.uint8
    image, _ = dataset[0]
    image[0, 0, 0] = 123.0
    assert entry.images[0, 0, 0] != 123.0, "items are copies, the stored volume is not modified"


def test_resize(tiny_dataset):
    dataset = SliceDataset(annotated_studies(tiny_dataset, [255]), image_size=16)
    image, mask = dataset[2]
    assert image.shape == mask.shape == (1, 16, 16)
    assert set(np.unique(mask.numpy())) <= {0.0, 1.0} and mask.sum() > 0


def test_resize_slices_modes():
    stack = np.zeros((2, 8, 8), dtype=np.float32)
    stack[:, :4] = 1.0
    small = resize_slices(stack, 4, "bilinear")
    np.testing.assert_allclose(small[:, 0], 1.0, atol=1e-6)
    np.testing.assert_allclose(small[:, 3], 0.0, atol=1e-6)
    assert small.mean() == pytest.approx(0.5, abs=1e-6)
    mask = resize_slices(stack.astype(np.uint8), 4, "mask")
    assert mask.dtype == np.uint8 and mask[:, :2].all() and not mask[:, 2:].any()
    back = resize_slices(mask, 8, "mask")
    np.testing.assert_array_equal(back, stack.astype(np.uint8))
    volume = np.arange(24).reshape(2, 3, 4)
    np.testing.assert_array_equal(from_slices(to_slices(volume)), volume)


def test_on_disk_cache_is_reused(tiny_dataset, tmp_path):
    studies = annotated_studies(tiny_dataset, [255, 256])
    first = SliceDataset(studies, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 4
    second = SliceDataset(studies, cache_dir=tmp_path / "cache")
    assert isinstance(second.studies[0].images, np.memmap)
    for i in range(len(first)):
        torch.testing.assert_close(first[i], second[i])


def test_bad_masks_are_refused(tiny_dataset):
    hu, mask = synthetic_ct(seed=255)
    write_nifti(mask_path(tiny_dataset, 255), mask * 255)
    with pytest.raises(DataError, match="study_0255_mask.nii.gz: mask values must be 0 or 1, found 255"):
        SliceDataset(annotated_studies(tiny_dataset, [255]))
    write_nifti(mask_path(tiny_dataset, 256), mask[:, :, :4])
    with pytest.raises(DataError, match="study_0256_mask.nii.gz: mask shape"):
        SliceDataset(annotated_studies(tiny_dataset, [256]))
