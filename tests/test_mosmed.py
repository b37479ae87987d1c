import pytest

from covidseg.errors import DataError
from covidseg.mosmed import (
    ANNOTATED_IDS,
    CATEGORY_COUNTS,
    REGISTRY_NAME,
    annotated_studies,
    discover_studies,
    mask_path,
)

from conftest import write_tiny_dataset


def test_constants():
    assert len(ANNOTATED_IDS) == 50 and ANNOTATED_IDS[0] == 255 and ANNOTATED_IDS[-1] == 304
    assert sum(CATEGORY_COUNTS.values()) == 1110


def test_discover_with_and_without_registry(tmp_path):
    write_tiny_dataset(tmp_path / "a", ids=(255, 256), registry=True)
    write_tiny_dataset(tmp_path / "b", ids=(255, 256), registry=False)
    for root in (tmp_path / "a", tmp_path / "b"):
        studies = discover_studies(root)
        assert [s.study_id for s in studies] == [255, 256]
        assert all(s.category == "CT-1" and s.mask is not None and s.mask.is_file() for s in studies)
        assert studies[0].name == "study_0255"


def test_registry_format_matches_mosmeddata(tmp_path):
    write_tiny_dataset(tmp_path, ids=(255,))
    text = (tmp_path / REGISTRY_NAME).read_bytes().decode("utf-8")
    assert text.startswith("\ufeffstudy_id,category,study_file,mask_file\r\n")
    assert "255,CT-1,/studies/CT-1/study_0255.nii.gz,/masks/study_0255_mask.nii.gz\r\n" in text


def test_real_registry_is_read(real_masks, tmp_path):
    """The real registry's format parses (files are absent here, so it reports the first one)."""
    (tmp_path / REGISTRY_NAME).write_bytes((real_masks / REGISTRY_NAME).read_bytes())
    with pytest.raises(DataError, match="study_0001.nii.gz: named by dataset_registry.csv line 2 but missing"):
        discover_studies(tmp_path)


def test_bad_layouts(tmp_path):
    with pytest.raises(DataError, match="data folder not found"):
        discover_studies(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no MosMedData studies found"):
        discover_studies(tmp_path / "empty")
    root = tmp_path / "orphan"
    write_tiny_dataset(root, ids=(255,), registry=False)
    orphan = mask_path(root, 300)
    orphan.write_bytes(mask_path(root, 255).read_bytes())
    with pytest.raises(DataError, match="study_0300_mask.nii.gz: mask has no matching study"):
        discover_studies(root)


def test_missing_mask_of_annotated_study(tmp_path):
    write_tiny_dataset(tmp_path, ids=(255, 256), registry=False)
    mask_path(tmp_path, 256).unlink()
    with pytest.raises(DataError, match="study_0256_mask.nii.gz: mask of an annotated study is missing"):
        annotated_studies(tmp_path, [255, 256])
    with pytest.raises(DataError, match="study_0257.nii.gz: annotated study not found"):
        annotated_studies(tmp_path, [257])


def test_registry_naming_missing_file(tmp_path):
    write_tiny_dataset(tmp_path, ids=(255, 256))
    mask_path(tmp_path, 256).unlink()
    with pytest.raises(DataError, match="study_0256_mask.nii.gz: named by dataset_registry.csv line 3 but missing"):
        discover_studies(tmp_path)
