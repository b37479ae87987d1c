"""The package's metrics reproduce a published peer's evaluation on the real masks.

MiniSeg (Qiu et al., AAAI 2021) published its 5-fold cross-validation predictions for the 785
lesion slices of the 50 annotated MosMedData studies; ``../shared/data/miniseg-mosmed-predictions``
holds them with reference scores computed independently. Scoring them with
:mod:`covidseg.metrics` must give the same numbers to 4 decimals. The same masks also show what a
model that predicts nothing scores under each averaging.
"""

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from covidseg.metrics import evaluate_studies, slice_dice, study_scores
from covidseg.mosmed import ANNOTATED_IDS
from covidseg.splits import MINISEG_FOLDS, get_split, mask_facts

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MASKS = SHARED_DATA / "mosmed-masks"
PREDICTIONS = SHARED_DATA / "miniseg-mosmed-predictions"
PNG_NAME = re.compile(r"CrossVal(?P<fold>[1-5])__study_(?P<study>\d{4})_(?P<slice>\d{4})\.png")

# Reference scores of the predictions' README (MiniSeg's protocol: Dice per lesion slice,
# an empty prediction scores 0).
FOLD_SLICE_MEANS = (0.6424, 0.6261, 0.6999, 0.6356, 0.6379)
MEAN_OF_FOLDS = 0.6484
ALL_SLICES_MEAN = 0.6479
LESION_SLICES = 785
EMPTY_PREDICTIONS = 16
POOLED = 0.7238
PER_STUDY = {"mean": 0.6855, "median": 0.7109, "min": 0.0000, "max": 0.8955}
PLACES = 1e-4 / 2  # "to 4 decimals": within half a unit of the 4th decimal

# The range of the thesis' reported test Dice: a model that predicts nothing lands in it when
# scored per slice with an empty slice counting 1.
NOTHING_ONE_RANGE = (0.54, 0.70)

pytestmark = pytest.mark.shared


@pytest.fixture(scope="module")
def truths():
    """Study id -> real mask as a boolean stack of axial slices ``(Z, Y, X)``; each file read once.

    Slice ``k`` of the stack is ``mask.get_fdata()[:, :, k].T``, the geometry of MiniSeg's PNGs.
    The nibabel array is in the file's (Fortran) order, so its transpose is a free C-ordered view.
    """
    if not MASKS.is_dir():
        pytest.skip(reason="real masks not available (shared/data/mosmed-masks absent)")
    stacks = {}
    for i in ANNOTATED_IDS:
        mask = np.asanyarray(nib.load(MASKS / f"study_{i:04d}_mask.nii.gz").dataobj).T
        stacks[i] = mask == 1
        assert np.count_nonzero(mask) == np.count_nonzero(stacks[i]), f"study {i}: mask is not 0/1"
    return stacks


@pytest.fixture(scope="module")
def miniseg(truths):
    """MiniSeg's predictions, restricted like the reference scores to the lesion slices.

    Returns:
        ``(folds, lesion_index, predictions, pngs)``: study id -> fold (1..5); study id -> the
        indices of its lesion slices; study id -> predictions of those slices, a boolean stack
        ``(K, Y, X)``; the PNG files.
    """
    if not PREDICTIONS.is_dir():
        pytest.skip(reason="MiniSeg's predictions not available (shared/data/miniseg-mosmed-predictions absent)")
    from PIL import Image

    lesion_index = {i: np.flatnonzero(t.any(axis=(1, 2))) for i, t in truths.items()}
    row = {(i, int(k)): n for i, ks in lesion_index.items() for n, k in enumerate(ks)}
    predictions = {i: np.zeros((len(ks), 512, 512), dtype=bool) for i, ks in lesion_index.items()}
    folds, filled, pngs = {}, set(), sorted(PREDICTIONS.glob("*.png"))
    for png in pngs:
        match = PNG_NAME.fullmatch(png.name)
        assert match, f"unexpected file name {png.name}"
        study, k = int(match["study"]), int(match["slice"])
        assert folds.setdefault(study, int(match["fold"])) == int(match["fold"]), f"study {study} in two folds"
        assert (study, k) in row, f"{png.name} predicts a slice without lesion"
        assert (study, k) not in filled, f"two files for study {study} slice {k}"
        pixels = np.asarray(Image.open(png))
        assert pixels.shape == (512, 512) and not ((pixels != 0) & (pixels != 255)).any(), png.name
        predictions[study][row[study, k]] = pixels == 255  # PNG row r, column c is voxel [c, r, k]
        filled.add((study, k))
    return folds, lesion_index, predictions, pngs


def test_the_pngs_are_exactly_the_lesion_slices(truths, miniseg):
    folds, lesion_index, _, pngs = miniseg
    assert len(pngs) == LESION_SLICES
    with_png = {(int(m["study"]), int(m["slice"])) for m in (PNG_NAME.fullmatch(p.name) for p in pngs)}
    lesion = {(i, int(k)) for i, ks in lesion_index.items() for k in ks}
    assert lesion == with_png  # no lesion slice without a PNG, no PNG on an empty slice
    assert {i: len(ks) for i, ks in lesion_index.items()} == {i: f["lesion_slices"] for i, f in mask_facts().items()}
    assert {f: tuple(sorted(i for i, g in folds.items() if g == f)) for f in range(1, 6)} == {
        f: MINISEG_FOLDS[f - 1] for f in range(1, 6)
    }


def test_miniseg_conformance(truths, miniseg):
    folds, lesion_index, predictions, _ = miniseg
    lesion_truths = {i: truths[i][ks] for i, ks in lesion_index.items()}  # (K, Y, X), slices first

    # All 50 studies over their 785 lesion slices: per slice (MiniSeg's protocol, "skip" empty
    # truths: there are none here), pooled over voxels, and per study pooled over its slices.
    everything = evaluate_studies(predictions, lesion_truths)
    assert everything["n_lesion_slices"] == everything["n_slices"] == LESION_SLICES
    assert everything["lesion_slices_missed"] == EMPTY_PREDICTIONS
    assert everything["per_slice_dice_skip"] == pytest.approx(ALL_SLICES_MEAN, abs=PLACES)
    assert everything["per_slice_dice_one"] == everything["per_slice_dice_skip"]  # no empty truth
    assert everything["pooled_dice"] == pytest.approx(POOLED, abs=PLACES)
    assert everything["mean_dice"] == pytest.approx(PER_STUDY["mean"], abs=PLACES)
    assert everything["median_dice"] == pytest.approx(PER_STUDY["median"], abs=PLACES)
    assert everything["min_dice"] == pytest.approx(PER_STUDY["min"], abs=PLACES)
    assert everything["max_dice"] == pytest.approx(PER_STUDY["max"], abs=PLACES)

    # Each fold's test studies, per slice.
    fold_means = []
    for fold, expected in enumerate(FOLD_SLICE_MEANS, start=1):
        ids = [i for i in sorted(folds) if folds[i] == fold]
        result = evaluate_studies({i: predictions[i] for i in ids}, {i: lesion_truths[i] for i in ids})
        assert result["per_slice_dice_skip"] == pytest.approx(expected, abs=PLACES), f"fold {fold}"
        fold_means.append(result["per_slice_dice_skip"])
    assert np.mean(fold_means) == pytest.approx(MEAN_OF_FOLDS, abs=PLACES)

    # On whole studies (empty prediction where no PNG): the same, since "skip" leaves out the
    # slices without lesion and they add no voxel to the pooled counts.
    for i in (255, 300):
        whole = np.zeros_like(truths[i])
        whole[lesion_index[i]] = predictions[i]
        assert slice_dice(whole, truths[i], empty="skip", reduction="mean") == pytest.approx(
            slice_dice(predictions[i], lesion_truths[i], reduction="mean"), abs=1e-12
        )
        assert study_scores(whole, truths[i]) == pytest.approx(
            {k: everything["per_study"][i][k] for k in ("dice", "iou", "precision", "recall")}, abs=1e-12
        )


@pytest.mark.parametrize("part", ["thesis test split", "all 50 studies"])
def test_predicting_nothing_on_the_real_masks(truths, part):
    ids = get_split("thesis").test if part == "thesis test split" else ANNOTATED_IDS
    nothing = {i: np.broadcast_to(False, truths[i].shape) for i in ids}  # no memory for the zeros
    result = evaluate_studies(nothing, {i: truths[i] for i in ids})
    empty_slices = sum(int(np.count_nonzero(~truths[i].any(axis=(1, 2)))) for i in ids)
    # per slice with empty = 1: the fraction of slices without lesion, in the thesis' range
    assert result["per_slice_dice_one"] == pytest.approx(empty_slices / result["n_slices"])
    assert NOTHING_ONE_RANGE[0] <= result["per_slice_dice_one"] <= NOTHING_ONE_RANGE[1]
    # every study has a lesion: per study, pooled and over lesion slices it scores 0
    assert result["mean_dice"] == result["max_dice"] == result["pooled_dice"] == 0.0
    assert result["per_slice_dice_skip"] == 0.0
    assert result["baseline"] == pytest.approx({k: result[k] for k in result["baseline"]})
