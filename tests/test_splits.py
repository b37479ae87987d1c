import nibabel as nib
import pytest

from covidseg.mosmed import ANNOTATED_IDS
from covidseg.splits import (
    MINISEG_FOLDS,
    SPLIT_NAMES,
    THESIS_SLICES,
    THESIS_TEST_STUDY_SLICES,
    get_split,
    reconstruct_thesis_split,
    slice_counts,
)


@pytest.mark.parametrize("name", SPLIT_NAMES)
def test_every_split_partitions_the_50_studies(name):
    split = get_split(name)
    parts = [set(split.train), set(split.val), set(split.test)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert parts[0] | parts[1] | parts[2] == set(ANNOTATED_IDS)


def test_thesis_split_meets_every_constraint_of_the_thesis():
    split = get_split("thesis")
    assert (len(split.train), len(split.val), len(split.test)) == (35, 5, 10)
    assert split.slices() == THESIS_SLICES == {"train": 1428, "val": 212, "test": 409}
    assert sum(slice_counts().values()) == 2049
    # the thesis' prediction figures show a 40-slice test study: only 271 and 299 have 40 slices
    forty = {i for i, n in slice_counts().items() if n == THESIS_TEST_STUDY_SLICES == 40}
    assert forty == {271, 299}
    assert forty & set(split.test)


def test_shipped_thesis_split_is_what_the_deterministic_search_finds():
    assert reconstruct_thesis_split() == (get_split("thesis").val, get_split("thesis").test)


def test_reconstruction_on_counts_worked_out_by_hand():
    # 41 slices each, except study 3 (40) and study 45 (48). Test: ids 0..9 give 9 x 41 + 40 = 409
    # and hold the 40-slice study, the first such 10-subset in combinations order. Validation:
    # 212 = 4 x 41 + 48 needs study 45, with the first four remaining ids, 10..13.
    counts = {i: 41 for i in range(50)} | {3: 40, 45: 48}
    assert reconstruct_thesis_split(counts) == ((10, 11, 12, 13, 45), tuple(range(10)))
    with pytest.raises(ValueError, match="no 35/5/10 split"):
        reconstruct_thesis_split({i: 41 for i in range(50)})  # 10 x 41 = 410, never 409


def test_thesis_split_slice_counts_on_the_real_masks(real_masks):
    """The shipped slice counts are the real masks' axial (third-axis) extents."""
    counts = {sid: nib.load(real_masks / f"study_{sid:04d}_mask.nii.gz").shape[2] for sid in ANNOTATED_IDS}
    assert counts == slice_counts()
    split = get_split("thesis")
    assert {p: sum(counts[i] for i in split.part(p)) for p in ("train", "val", "test")} == THESIS_SLICES


def test_miniseg_folds_match_the_published_readme(real_masks):
    readme = (real_masks.parent / "miniseg-mosmed-predictions" / "README.md").read_text()
    for k, fold in enumerate(MINISEG_FOLDS, start=1):
        line = f"- {k}: " + " ".join(f"{i:04d}" for i in fold)
        assert line in readme
        assert get_split(f"miniseg-fold-{k}").test == fold
    assert sorted(i for fold in MINISEG_FOLDS for i in fold) == list(ANNOTATED_IDS)


def test_unknown_split_lists_valid_names():
    with pytest.raises(ValueError, match="valid splits: thesis, miniseg-fold-1"):
        get_split("coronal")
    with pytest.raises(ValueError, match="valid parts"):
        get_split().part("holdout")
